"""A small CRI client: the calls kubelet makes to pull an image and run a pod.

It speaks the Kubernetes CRI API (``runtime.v1``, the subset generated under
``stargz.service.proto.k8s``) over a unix socket, either containerd's own (its CRI plugin)
or the daemon's CRI image-service socket (the keychain proxy), which is what kubelet's
``--image-service-endpoint`` points at::

    with CRIClient(containerd.address) as cri:
        image_id = cri.pull(ref)
        pod = cri.run_pod("reader", log_dir)
        ctr = cri.create_container(pod, "reader", ref, ["sh", "-c", "cat /etc/greeting"])
        cri.start_container(ctr)
        ...
        cri.remove_pod(pod)

Pods use the host's network namespace (``NamespaceOption.network = NODE``): no CNI plugin
is installed on the test machines.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

import grpc

from stargz.service.proto.k8s.cri.runtime.v1 import api_pb2 as cri
from stargz.service.proto.k8s.cri.runtime.v1 import api_pb2_grpc as cri_grpc

from .procs import HarnessError

__all__ = ["CRIClient", "cri", "read_cri_log"]


class CRIClient:
    """RuntimeService and ImageService stubs on one channel to ``address`` (a unix socket)."""

    def __init__(self, address: str, *, timeout: float = 120) -> None:
        self.address = address
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix:{address}")
        self.runtime = cri_grpc.RuntimeServiceStub(self.channel)
        self.images = cri_grpc.ImageServiceStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- images ---------------------------------------------------------------------------

    def pull(self, ref: str, auth: cri.AuthConfig | None = None) -> str:
        """``PullImage`` (with ``auth``, as kubelet sends a pod's pull secret); returns the
        image ID containerd reports."""
        req = cri.PullImageRequest(image=cri.ImageSpec(image=ref), auth=auth)
        return self.images.PullImage(req, timeout=self.timeout).image_ref

    def list_images(self) -> list[cri.Image]:
        return list(self.images.ListImages(cri.ListImagesRequest(), timeout=30).images)

    def image_status(self, ref: str) -> cri.Image | None:
        resp = self.images.ImageStatus(
            cri.ImageStatusRequest(image=cri.ImageSpec(image=ref)), timeout=30
        )
        return resp.image if resp.HasField("image") else None

    def remove_image(self, ref: str) -> None:
        self.images.RemoveImage(cri.RemoveImageRequest(image=cri.ImageSpec(image=ref)), timeout=60)

    def image_fs_info(self) -> cri.ImageFsInfoResponse:
        return self.images.ImageFsInfo(cri.ImageFsInfoRequest(), timeout=30)

    # --- pods and containers ---------------------------------------------------------------

    def pod_config(self, name: str, log_dir: Path) -> cri.PodSandboxConfig:
        """A pod on the host network (no CNI), logging under ``log_dir``."""
        return cri.PodSandboxConfig(
            metadata=cri.PodSandboxMetadata(
                name=name, uid=uuid.uuid4().hex, namespace="default", attempt=0
            ),
            log_directory=str(log_dir),
            linux=cri.LinuxPodSandboxConfig(
                security_context=cri.LinuxSandboxSecurityContext(
                    namespace_options=cri.NamespaceOption(network=cri.NODE)
                )
            ),
        )

    def run_pod(self, config: cri.PodSandboxConfig) -> str:
        """``RunPodSandbox``: the sandbox (pause) container runs; returns the pod ID."""
        resp = self.runtime.RunPodSandbox(cri.RunPodSandboxRequest(config=config), timeout=120)
        return resp.pod_sandbox_id

    def create_container(
        self,
        pod_id: str,
        pod: cri.PodSandboxConfig,
        name: str,
        image: str,
        command: Sequence[str],
        *,
        log_path: str | None = None,
    ) -> str:
        """``CreateContainer`` of ``image`` running ``command`` in the pod; its output goes
        to ``<pod log_directory>/<log_path>`` (default ``<name>.log``)."""
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=name, attempt=0),
            image=cri.ImageSpec(image=image),
            command=list(command),
            log_path=log_path or f"{name}.log",
            linux=cri.LinuxContainerConfig(),
        )
        req = cri.CreateContainerRequest(pod_sandbox_id=pod_id, config=config, sandbox_config=pod)
        return self.runtime.CreateContainer(req, timeout=120).container_id

    def start_container(self, container_id: str) -> None:
        self.runtime.StartContainer(
            cri.StartContainerRequest(container_id=container_id), timeout=120
        )

    def container_status(self, container_id: str) -> cri.ContainerStatus:
        req = cri.ContainerStatusRequest(container_id=container_id)
        return self.runtime.ContainerStatus(req, timeout=30).status

    def wait_exited(self, container_id: str, timeout: float = 60) -> cri.ContainerStatus:
        """Poll ``ContainerStatus`` until the container has exited; its final status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.container_status(container_id)
            if status.state == cri.CONTAINER_EXITED:
                return status
            if time.monotonic() > deadline:
                raise HarnessError(
                    f"container {container_id} still {cri.ContainerState.Name(status.state)} "
                    f"after {timeout}s"
                )
            time.sleep(0.1)

    def list_containers(self, pod_id: str | None = None) -> list[cri.Container]:
        filt = cri.ContainerFilter(pod_sandbox_id=pod_id) if pod_id else None
        req = cri.ListContainersRequest(filter=filt)
        return list(self.runtime.ListContainers(req, timeout=30).containers)

    def remove_pod(self, pod_id: str) -> None:
        """Stop and remove every container of the pod, then the pod (as kubelet does)."""
        for c in self.list_containers(pod_id):
            self.runtime.StopContainer(
                cri.StopContainerRequest(container_id=c.id, timeout=5), timeout=60
            )
            self.runtime.RemoveContainer(cri.RemoveContainerRequest(container_id=c.id), timeout=60)
        self.runtime.StopPodSandbox(cri.StopPodSandboxRequest(pod_sandbox_id=pod_id), timeout=60)
        self.runtime.RemovePodSandbox(
            cri.RemovePodSandboxRequest(pod_sandbox_id=pod_id), timeout=60
        )

    def list_pods(self) -> list[Any]:
        return list(self.runtime.ListPodSandbox(cri.ListPodSandboxRequest(), timeout=30).items)


def read_cri_log(path: Path) -> str:
    """The text a container wrote, from its CRI log file (``<time> <stream> <P|F> <text>``
    lines; ``P`` is a partial line continued by the next one)."""
    out = []
    for line in path.read_text().splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 3:
            raise HarnessError(f"{path}: not a CRI log line: {line!r}")
        text = parts[3] if len(parts) == 4 else ""
        out.append(text if parts[2] == "P" else text + "\n")
    return "".join(out)
