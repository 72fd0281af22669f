"""HelloBench: container start-up time side by side with the Go snapshotter."""
