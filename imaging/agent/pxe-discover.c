/*
 * pxe-discover: ask the subnet's PXE boot server where its HTTP service is.
 *
 * The imager needs the address of a pxepeer peer (pxepeer.server=http://IP:PORT). The
 * iPXE and GRUB paths put it on the kernel command line, but a signed unified kernel
 * image carries a command line fixed when it was signed, before anyone knew which peer
 * would answer PXE. So the imager asks, as PXE firmware does in boot-server discovery
 * (PXE spec 2.1, port 4011): a DHCPREQUEST with its own address in ciaddr, broadcast to
 * port 4011, where only PXE boot servers listen (never the store's DHCP server). The
 * elected peer answers with a DHCPACK whose boot file is its HTTP base URL.
 *
 * Trust: none is needed here. The answer only says where to fetch from; the agent
 * writes nothing that a trusted publisher did not sign, whoever answered.
 *
 * usage: pxe-discover [-t SECONDS] IFACE
 *   prints http://A.B.C.D:PORT and exits 0, or exits 1 when no server answered in
 *   SECONDS (default 20), 2 on bad usage. Static, libc only: it runs in the imager's
 *   initramfs beside busybox.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <net/if.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define PXE_PORT 4011
#define BOOTP_LEN 236
#define VENDOR_CLASS "pxepeer-imager"
#define MAX_URL 127

#if defined(__aarch64__)
#define ARCH_CODE 11 /* RFC 4578 / IANA: ARM 64-bit UEFI */
#else
#define ARCH_CODE 7 /* x64 UEFI */
#endif

static const uint8_t magic[4] = {99, 130, 83, 99};

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

static size_t build_request(uint8_t *p, uint32_t xid, const uint8_t mac[6], struct in_addr ip) {
    memset(p, 0, BOOTP_LEN);
    p[0] = 1; /* BOOTREQUEST */
    p[1] = 1; /* Ethernet */
    p[2] = 6;
    memcpy(p + 4, &xid, 4);
    memcpy(p + 12, &ip, 4); /* ciaddr: answers come back to us, not broadcast */
    memcpy(p + 28, mac, 6);
    size_t n = BOOTP_LEN;
    memcpy(p + n, magic, 4);
    n += 4;
    p[n++] = 53, p[n++] = 1, p[n++] = 3; /* DHCPREQUEST, as boot-server discovery sends */
    char vendor[64];
    int len = snprintf(vendor, sizeof vendor, "%s:Arch:%05d", VENDOR_CLASS, ARCH_CODE);
    p[n++] = 60, p[n++] = (uint8_t)len;
    memcpy(p + n, vendor, (size_t)len);
    n += (size_t)len;
    p[n++] = 93, p[n++] = 2, p[n++] = 0, p[n++] = ARCH_CODE;
    p[n++] = 55, p[n++] = 2, p[n++] = 60, p[n++] = 67;
    p[n++] = 255;
    while (n < 300) /* the minimum BOOTP size some servers insist on */
        p[n++] = 0;
    return n;
}

/* The option CODE of a reply (bounds-checked), or NULL. */
static const uint8_t *option(const uint8_t *p, size_t size, uint8_t code, size_t *len) {
    size_t i = BOOTP_LEN + 4;
    while (i < size) {
        uint8_t c = p[i];
        if (c == 255)
            break;
        if (c == 0) {
            i++;
            continue;
        }
        if (i + 1 >= size || i + 2 + p[i + 1] > size)
            return NULL; /* truncated: ignore the whole reply */
        if (c == code) {
            *len = p[i + 1];
            return p + i + 2;
        }
        i += 2 + (size_t)p[i + 1];
    }
    return NULL;
}

/* Keep http://A.B.C.D:PORT of a boot file URL; 0 when it is not one. */
static int http_origin(const char *url, size_t len, char *out) {
    const char *scheme = "http://";
    size_t s = strlen(scheme);
    if (len <= s || len > MAX_URL || strncmp(url, scheme, s) != 0)
        return 0;
    size_t i = s, dots = 0, colon = 0;
    for (; i < len && url[i] != '/'; i++) {
        char c = url[i];
        if (c == '.' && !colon)
            dots++;
        else if (c == ':' && !colon)
            colon = i;
        else if (c < '0' || c > '9')
            return 0;
    }
    if (dots != 3 || !colon || colon + 1 == i || i - colon > 6)
        return 0;
    char host[16];
    if (colon - s >= sizeof host)
        return 0;
    memcpy(host, url + s, colon - s);
    host[colon - s] = 0;
    struct in_addr a;
    long port = strtol(url + colon + 1, NULL, 10);
    if (inet_pton(AF_INET, host, &a) != 1 || port < 1 || port > 65535)
        return 0;
    snprintf(out, MAX_URL + 1, "http://%s:%ld", host, port);
    return 1;
}

static int accept_reply(const uint8_t *p, size_t size, uint32_t xid, const uint8_t mac[6],
                        char *out) {
    if (size < BOOTP_LEN + 4 || p[0] != 2 || memcmp(p + 4, &xid, 4) != 0 ||
        memcmp(p + 28, mac, 6) != 0 || memcmp(p + BOOTP_LEN, magic, 4) != 0)
        return 0;
    size_t len = 0;
    const uint8_t *type = option(p, size, 53, &len);
    if (type == NULL || len != 1 || *type != 5) /* DHCPACK */
        return 0;
    const uint8_t *vendor = option(p, size, 60, &len);
    if (vendor == NULL || len < strlen(VENDOR_CLASS) ||
        memcmp(vendor, VENDOR_CLASS, strlen(VENDOR_CLASS)) != 0)
        return 0; /* a boot server that did not understand the question */
    const uint8_t *file = option(p, size, 67, &len);
    if (file == NULL) {
        file = p + 108; /* the BOOTP file field */
        len = strnlen((const char *)file, 128);
    }
    return http_origin((const char *)file, len, out);
}

int main(int argc, char **argv) {
    double timeout = 20;
    int opt;
    while ((opt = getopt(argc, argv, "t:")) != -1) {
        if (opt == 't' && atof(optarg) > 0)
            timeout = atof(optarg);
        else {
            fprintf(stderr, "usage: pxe-discover [-t SECONDS] IFACE\n");
            return 2;
        }
    }
    if (optind + 1 != argc || strlen(argv[optind]) >= IFNAMSIZ) {
        fprintf(stderr, "usage: pxe-discover [-t SECONDS] IFACE\n");
        return 2;
    }
    const char *iface = argv[optind];
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        perror("pxe-discover: socket");
        return 1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, iface, IFNAMSIZ - 1);
    uint8_t mac[6];
    struct in_addr ip;
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) != 0) {
        fprintf(stderr, "pxe-discover: %s: %s\n", iface, strerror(errno));
        return 1;
    }
    memcpy(mac, ifr.ifr_hwaddr.sa_data, 6);
    if (ioctl(fd, SIOCGIFADDR, &ifr) != 0) {
        fprintf(stderr, "pxe-discover: %s has no IPv4 address: %s\n", iface, strerror(errno));
        return 1;
    }
    ip = ((struct sockaddr_in *)&ifr.ifr_addr)->sin_addr;
    int on = 1;
    if (setsockopt(fd, SOL_SOCKET, SO_BROADCAST, &on, sizeof on) != 0 ||
        setsockopt(fd, SOL_SOCKET, SO_BINDTODEVICE, iface, (socklen_t)strlen(iface)) != 0) {
        perror("pxe-discover: setsockopt");
        return 1;
    }
    struct sockaddr_in local = {.sin_family = AF_INET, .sin_addr = ip, .sin_port = 0};
    if (bind(fd, (struct sockaddr *)&local, sizeof local) != 0) {
        perror("pxe-discover: bind");
        return 1;
    }
    uint32_t xid = 0;
    int rnd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (rnd < 0 || read(rnd, &xid, sizeof xid) != (ssize_t)sizeof xid)
        xid = (uint32_t)getpid() ^ (uint32_t)(now() * 1e6);
    if (rnd >= 0)
        close(rnd);

    uint8_t packet[576], reply[1500];
    size_t size = build_request(packet, xid, mac, ip);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(PXE_PORT),
                             .sin_addr.s_addr = htonl(INADDR_BROADCAST)};
    double deadline = now() + timeout, wait = 1;
    char origin[MAX_URL + 1];
    while (now() < deadline) {
        if (sendto(fd, packet, size, 0, (struct sockaddr *)&to, sizeof to) < 0)
            perror("pxe-discover: sendto");
        /* Waits of 1, 2, 4, 4... s between asks: a peer electing itself may need a few. */
        double resend = now() + wait;
        wait = wait < 4 ? wait * 2 : 4;
        for (double left; (left = (resend < deadline ? resend : deadline) - now()) > 0;) {
            struct pollfd pfd = {.fd = fd, .events = POLLIN};
            if (poll(&pfd, 1, (int)(left * 1000) + 1) <= 0)
                continue;
            ssize_t got = recv(fd, reply, sizeof reply, 0);
            if (got > 0 && accept_reply(reply, (size_t)got, xid, mac, origin)) {
                printf("%s\n", origin);
                return 0;
            }
        }
    }
    fprintf(stderr, "pxe-discover: no PXE boot server answered on %s in %.0f s\n", iface,
            timeout);
    return 1;
}
