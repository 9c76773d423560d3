/* Reference point for benchmarks: a C UDP echo server that moves up to 32
 * datagrams per system call with recvmmsg/sendmmsg. Usage: c_echo PORT */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define BATCH 32
#define SIZE 2048

int main(int argc, char **argv) {
    int port = argc > 1 ? atoi(argv[1]) : 4200;
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port)};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (fd < 0 || bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        perror("bind");
        return 1;
    }
    printf("listening on 127.0.0.1:%d\n", port);
    fflush(stdout);
    static char bufs[BATCH][SIZE];
    struct sockaddr_in peers[BATCH];
    struct iovec iov[BATCH];
    struct mmsghdr msgs[BATCH];
    for (;;) {
        memset(msgs, 0, sizeof msgs);
        for (int i = 0; i < BATCH; i++) {
            iov[i].iov_base = bufs[i];
            iov[i].iov_len = SIZE;
            msgs[i].msg_hdr.msg_iov = &iov[i];
            msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &peers[i];
            msgs[i].msg_hdr.msg_namelen = sizeof peers[i];
        }
        int n = recvmmsg(fd, msgs, BATCH, MSG_WAITFORONE, NULL);
        if (n <= 0) continue;
        for (int i = 0; i < n; i++) iov[i].iov_len = msgs[i].msg_len;
        int sent = 0;
        while (sent < n) {
            int r = sendmmsg(fd, msgs + sent, n - sent, 0);
            if (r <= 0) break;
            sent += r;
        }
    }
}
