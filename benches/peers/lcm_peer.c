/* LCM throughput peer for benches/compare.sh: one publisher thread blasting messages of a
 * given payload size on a channel, one subscriber counting them, in one process.
 * Usage: lcm_peer PAYLOAD SECONDS
 * Prints: lcm sent=N received=M seconds=S
 * LCM's udpm provider sends on the default route's interface: run it in a private network
 * namespace whose only interface is loopback (compare.sh does). */
#include <lcm/lcm.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <time.h>

static volatile long received = 0;
static volatile int stop = 0;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void on_message(const lcm_recv_buf_t *rbuf, const char *channel, void *user) {
    (void)rbuf; (void)channel; (void)user;
    received++;
}

static void *reader(void *arg) {
    lcm_t *lcm = arg;
    int fd = lcm_get_fileno(lcm);
    while (!stop) {
        fd_set fds;
        FD_ZERO(&fds);
        FD_SET(fd, &fds);
        struct timeval tv = {0, 20000};
        if (select(fd + 1, &fds, NULL, NULL, &tv) > 0) lcm_handle(lcm);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int payload = argc > 1 ? atoi(argv[1]) : 64;
    double seconds = argc > 2 ? atof(argv[2]) : 5;
    const char *url = "udpm://239.255.76.67:7667?ttl=0";
    lcm_t *sub = lcm_create(url);
    lcm_t *pub = lcm_create(url);
    if (!sub || !pub) { fprintf(stderr, "lcm_create failed\n"); return 1; }
    lcm_subscribe(sub, "BENCH", on_message, NULL);
    pthread_t thread;
    pthread_create(&thread, NULL, reader, sub);
    char *buf = calloc(1, payload);
    long sent = 0;
    double start = now();
    while (now() - start < seconds) {
        for (int i = 0; i < 64; i++) {
            if (lcm_publish(pub, "BENCH", buf, payload) == 0) sent++;
        }
    }
    double elapsed = now() - start;
    double drain = now();
    while (now() - drain < 0.5) { struct timespec t = {0, 10000000}; nanosleep(&t, NULL); }
    stop = 1;
    pthread_join(thread, NULL);
    printf("lcm sent=%ld received=%ld seconds=%.3f\n", sent, received, elapsed);
    return 0;
}
