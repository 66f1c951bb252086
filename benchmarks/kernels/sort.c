/* Sort n pseudo-random 32-bit keys (introsort-like: quicksort with median of three, then
 * insertion sort for short runs), repeated; prints a checksum.  usage: sort N REPEAT */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static uint32_t state = 2463534242u;
static uint32_t next(void) {
    state ^= state << 13;
    state ^= state >> 17;
    state ^= state << 5;
    return state;
}

static void insertion(uint32_t *v, long lo, long hi) {
    for (long i = lo + 1; i <= hi; i++) {
        uint32_t x = v[i];
        long j = i - 1;
        while (j >= lo && v[j] > x) {
            v[j + 1] = v[j];
            j--;
        }
        v[j + 1] = x;
    }
}

static void quick(uint32_t *v, long lo, long hi) {
    while (hi - lo > 16) {
        long mid = lo + (hi - lo) / 2;
        uint32_t a = v[lo], b = v[mid], c = v[hi];
        uint32_t pivot = a < b ? (b < c ? b : (a < c ? c : a)) : (a < c ? a : (b < c ? c : b));
        long i = lo, j = hi;
        while (i <= j) {
            while (v[i] < pivot) i++;
            while (v[j] > pivot) j--;
            if (i <= j) {
                uint32_t t = v[i];
                v[i] = v[j];
                v[j] = t;
                i++;
                j--;
            }
        }
        if (j - lo < hi - i) {
            quick(v, lo, j);
            lo = i;
        } else {
            quick(v, i, hi);
            hi = j;
        }
    }
    insertion(v, lo, hi);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 1000000;
    int repeat = argc > 2 ? atoi(argv[2]) : 1;
    uint32_t *v = malloc(sizeof(uint32_t) * n);
    if (!v) return 1;
    uint64_t check = 0;
    for (int r = 0; r < repeat; r++) {
        for (long i = 0; i < n; i++) v[i] = next();
        quick(v, 0, n - 1);
        for (long i = 1; i < n; i++)
            if (v[i - 1] > v[i]) return 2;
        check += v[n / 2] + v[n / 3];
    }
    printf("%llu\n", (unsigned long long)check);
    return 0;
}
