"""Container images on disk: OCI image layouts and their conversion to eStargz."""
