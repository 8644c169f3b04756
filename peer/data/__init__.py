"""Files pxepeer installs on a host: the systemd unit (`pxepeer install-service`)."""
