/* Sleeps for the number of milliseconds given as its datum (nanosleep, which wasi-libc turns
 * into a poll_oneoff clock subscription), then prints how long it slept by the monotonic
 * clock, in milliseconds: a slice that blocks in a host call rather than running wasm. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

int main(void) {
    char buf[32] = {0};
    fread(buf, 1, sizeof buf - 1, stdin);
    long ms = atol(buf);
    struct timespec start, end, req = {ms / 1000, (ms % 1000) * 1000000L};
    clock_gettime(CLOCK_MONOTONIC, &start);
    if (nanosleep(&req, NULL) != 0) {
        puts("nanosleep failed");
        return 1;
    }
    clock_gettime(CLOCK_MONOTONIC, &end);
    printf("slept %ld\n",
           (long)((end.tv_sec - start.tv_sec) * 1000 + (end.tv_nsec - start.tv_nsec) / 1000000));
    return 0;
}
