/* Dense matrix multiply, C = A x B, n x n doubles, repeated; prints a checksum.
 * usage: matmul N REPEAT */
#include <stdio.h>
#include <stdlib.h>

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 256;
    int repeat = argc > 2 ? atoi(argv[2]) : 1;
    double *a = malloc(sizeof(double) * n * n);
    double *b = malloc(sizeof(double) * n * n);
    double *c = malloc(sizeof(double) * n * n);
    if (!a || !b || !c) return 1;
    for (int i = 0; i < n * n; i++) {
        a[i] = (double)((i * 7) % 13) / 13.0;
        b[i] = (double)((i * 11) % 17) / 17.0;
    }
    double check = 0.0;
    for (int r = 0; r < repeat; r++) {
        for (int i = 0; i < n * n; i++) c[i] = 0.0;
        for (int i = 0; i < n; i++)
            for (int k = 0; k < n; k++) {
                double aik = a[i * n + k] + r;
                const double *brow = b + k * n;
                double *crow = c + i * n;
                for (int j = 0; j < n; j++) crow[j] += aik * brow[j];
            }
        check += c[(r * 31) % (n * n)];
    }
    printf("%.6f\n", check);
    return 0;
}
