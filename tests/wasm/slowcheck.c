/* A verifier for echo jobs that takes its time: sleeps for the milliseconds given as the job's
 * first argument (argv[2]; argv[1] is the datum's length), then accepts the result (exit 0)
 * if and only if it equals the datum. Its stdin is the datum followed by the result. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static char buf[1 << 16];

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    long n = atol(argv[1]);
    long ms = atol(argv[2]);
    size_t len = fread(buf, 1, sizeof buf, stdin);
    struct timespec req = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&req, NULL);
    if (n < 0 || (long)len != 2 * n) return 1;
    return memcmp(buf, buf + n, (size_t)n) == 0 ? 0 : 1;
}
