/* ZeroMQ PUB/SUB throughput peer for benches/compare.sh, over TCP on 127.0.0.1. One process: a PUB socket blasting messages of a given
 * size, a SUB socket counting them in another thread.
 * Usage: zmq_peer ENDPOINT PAYLOAD SECONDS [HWM]
 * HWM is the high-water mark of both sockets (default 1000, ZeroMQ's own); 0 means unbounded,
 * ZeroMQ's honest no-loss setting: the queue then grows instead of dropping, and the run waits
 * (up to 60 s) until every message is received.
 * "sent" counts messages zmq_send accepted; the gap to "received" is what ZeroMQ dropped at its
 * high-water marks, silently. "seconds" runs from the first send to the last message received
 * (or the end of sending, whichever is later), so received/seconds is the delivered rate.
 * Prints: zmq sent=N received=M seconds=S hwm=H */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <zmq.h>

static volatile long received = 0;
static volatile int stop = 0;
static void *context;
static const char *endpoint;
static int hwm = 1000;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void *reader(void *arg) {
    (void)arg;
    void *sub = zmq_socket(context, ZMQ_SUB);
    int timeout = 20;
    zmq_setsockopt(sub, ZMQ_RCVHWM, &hwm, sizeof hwm);
    zmq_setsockopt(sub, ZMQ_RCVTIMEO, &timeout, sizeof timeout);
    zmq_setsockopt(sub, ZMQ_SUBSCRIBE, "", 0);
    if (zmq_connect(sub, endpoint) != 0) { fprintf(stderr, "connect: %s\n", zmq_strerror(errno)); exit(1); }
    char buf[65536];
    while (!stop) {
        if (zmq_recv(sub, buf, sizeof buf, 0) >= 0) received++;
    }
    zmq_close(sub);
    return NULL;
}

int main(int argc, char **argv) {
    endpoint = argc > 1 ? argv[1] : "tcp://127.0.0.1:47790";
    int payload = argc > 2 ? atoi(argv[2]) : 64;
    double seconds = argc > 3 ? atof(argv[3]) : 5;
    hwm = argc > 4 ? atoi(argv[4]) : 1000;
    context = zmq_ctx_new();
    void *pub = zmq_socket(context, ZMQ_PUB);
    zmq_setsockopt(pub, ZMQ_SNDHWM, &hwm, sizeof hwm);
    if (zmq_bind(pub, endpoint) != 0) { fprintf(stderr, "bind %s: %s\n", endpoint, zmq_strerror(errno)); return 1; }
    pthread_t thread;
    pthread_create(&thread, NULL, reader, NULL);
    struct timespec settle = {0, 300000000};
    nanosleep(&settle, NULL); /* the slow-joiner: let SUB connect before sending */
    char *buf = calloc(1, payload);
    long sent = 0;
    double start = now();
    while (now() - start < seconds) {
        for (int i = 0; i < 64; i++) {
            if (zmq_send(pub, buf, payload, ZMQ_DONTWAIT) == payload) sent++;
        }
    }
    double elapsed = now() - start;
    double drain = now();
    /* A bounded queue drops what does not fit: half a second drains the rest. Unbounded, every
     * message arrives eventually: wait for the last one. */
    double drain_limit = hwm == 0 ? 60.0 : 0.5;
    long last = -1;
    double last_progress = now();
    while (now() - drain < drain_limit && received < sent) {
        struct timespec t = {0, 1000000};
        nanosleep(&t, NULL);
        if (received != last) { last = received; last_progress = now(); }
        if (now() - last_progress > 2.0) break; /* stalled: report what arrived */
    }
    if (hwm == 0 && last_progress - start > elapsed) elapsed = last_progress - start;
    stop = 1;
    pthread_join(thread, NULL);
    printf("zmq sent=%ld received=%ld seconds=%.3f hwm=%d\n", sent, received, elapsed, hwm);
    int linger = 0;
    zmq_setsockopt(pub, ZMQ_LINGER, &linger, sizeof linger);
    zmq_close(pub);
    zmq_ctx_term(context);
    return 0;
}
