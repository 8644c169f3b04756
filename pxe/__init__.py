"""pxepeer: how a machine boots from the network (DHCP/proxyDHCP, TFTP, iPXE, boot policy)."""
