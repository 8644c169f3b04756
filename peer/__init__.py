"""pxepeer: how content moves between peers, and the daemon and CLI."""
