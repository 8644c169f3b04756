"""pxepeer: what an image is (chunks, manifests, signatures) and the netboot imaging environment."""
