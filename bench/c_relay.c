/* Reference point for the DNS benchmark: the least a UDP forwarder does. It
 * moves up to 32 datagrams per system call with recvmmsg/sendmmsg both
 * ways, gives each query the next 16-bit ID, remembers the client by that
 * ID and puts the client's ID back on the answer. No parsing, no checks,
 * no timeouts: not a forwarder to run, only the cost of the system calls
 * and copies every forwarder pays. Usage: c_relay PORT UPSTREAM_PORT */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define BATCH 32
#define SIZE 4096

struct pending {
    struct sockaddr_in client;
    uint16_t id;
};

static struct pending table[65536];
static char bufs[BATCH][SIZE];
static struct sockaddr_in peers[BATCH];
static struct iovec iov[BATCH];
static struct mmsghdr msgs[BATCH];

static void prepare(void) {
    memset(msgs, 0, sizeof msgs);
    for (int i = 0; i < BATCH; i++) {
        iov[i].iov_base = bufs[i];
        iov[i].iov_len = SIZE;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_name = &peers[i];
        msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
    }
}

static void send_all(int fd, int n) {
    int sent = 0;
    while (sent < n) {
        int r = sendmmsg(fd, msgs + sent, n - sent, 0);
        if (r <= 0) break;
        sent += r;
    }
}

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 5393;
    int upstream_port = argc > 2 ? atoi(argv[2]) : 5390;
    int clients = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    int upstream = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    struct sockaddr_in up = {.sin_family = AF_INET, .sin_port = htons(upstream_port)};
    up.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (clients < 0 || upstream < 0 || bind(clients, (struct sockaddr *)&addr, sizeof addr) < 0 ||
        connect(upstream, (struct sockaddr *)&up, sizeof up) < 0) {
        perror("socket");
        return 1;
    }
    uint16_t next_id = 0;
    struct pollfd fds[2] = {{.fd = clients, .events = POLLIN}, {.fd = upstream, .events = POLLIN}};
    for (;;) {
        if (poll(fds, 2, -1) <= 0) continue;
        if (fds[0].revents & POLLIN) {
            prepare();
            int n = recvmmsg(clients, msgs, BATCH, 0, NULL);
            for (int i = 0; i < n; i++) {
                iov[i].iov_len = msgs[i].msg_len;
                if (msgs[i].msg_len < 12) continue;
                uint16_t id = next_id++;
                table[id].client = peers[i];
                memcpy(&table[id].id, bufs[i], 2);
                memcpy(bufs[i], &id, 2);
                msgs[i].msg_hdr.msg_name = NULL;
                msgs[i].msg_hdr.msg_namelen = 0;
            }
            if (n > 0) send_all(upstream, n);
        }
        if (fds[1].revents & POLLIN) {
            prepare();
            int n = recvmmsg(upstream, msgs, BATCH, 0, NULL);
            for (int i = 0; i < n; i++) {
                iov[i].iov_len = msgs[i].msg_len;
                if (msgs[i].msg_len < 12) continue;
                uint16_t id;
                memcpy(&id, bufs[i], 2);
                peers[i] = table[id].client;
                memcpy(bufs[i], &table[id].id, 2);
            }
            if (n > 0) send_all(clients, n);
        }
    }
}
