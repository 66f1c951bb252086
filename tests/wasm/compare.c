/* A job's comparison function (redundancy.compare, runtime wasm): stdin is the datum, then
 * the first result, then the second; argv[1] and argv[2] their first two lengths. The two
 * results agree (exit 0) when they are numbers equal within a relative 1e-6; otherwise it
 * exits 1 (they disagree). */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char all[1 << 16];

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    size_t n = strtoul(argv[1], NULL, 10), m = strtoul(argv[2], NULL, 10);
    size_t len = fread(all, 1, sizeof all - 1, stdin);
    if (n + m > len || m > 63 || len - n - m > 63) return 1;
    char a[64] = {0}, b[64] = {0};
    memcpy(a, all + n, m);
    memcpy(b, all + n + m, len - n - m);
    double x = strtod(a, NULL), y = strtod(b, NULL);
    return fabs(x - y) <= 1e-6 * fmax(1.0, fabs(x)) ? 0 : 1;
}
