/*
 * Proof-of-work puzzle, a WASI command.
 *
 * stdin:  the slice's prefix (one line; a trailing newline is ignored)
 * argv:   argv[1] = D, the number of leading zero bits required (default 16)
 *         argv[2] = optional first nonce to try (default 0)
 * stdout: "<nonce> <sha256 hex>\n" for the smallest nonce >= start such that
 *         SHA-256(prefix || decimal(nonce)) has at least D leading zero bits.
 *
 * Reports progress through the optional import dcp.progress(f64) every 2^16 nonces, as an
 * estimate of the expected work done (the search is unbounded in principle).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef __wasm__
__attribute__((import_module("dcp"), import_name("progress")))
#endif
void dcp_progress(double fraction);

#include "sha256.h"

int main(int argc, char **argv) {
    static uint8_t msg[4096 + 32];
    size_t len = fread(msg, 1, 4096, stdin);
    if (!feof(stdin)) { fputs("prefix longer than 4096 bytes\n", stderr); return 2; }
    while (len > 0 && (msg[len - 1] == '\n' || msg[len - 1] == '\r')) len--;
    int difficulty = argc > 1 ? atoi(argv[1]) : 16;
    if (difficulty < 0 || difficulty > 64) { fputs("difficulty must be 0..64\n", stderr); return 2; }
    uint64_t nonce = argc > 2 ? strtoull(argv[2], NULL, 10) : 0;
    double expected = (double)((uint64_t)1 << (difficulty > 62 ? 62 : difficulty));
    uint8_t digest[32];
    for (uint64_t tried = 0;; nonce++, tried++) {
        int n = snprintf((char *)msg + len, 32, "%llu", (unsigned long long)nonce);
        sha256(msg, len + (size_t)n, digest);
        if (leading_zero_bits(digest) >= difficulty) break;
        if ((tried & 0xffff) == 0xffff) {
            double f = (double)tried / expected;
            dcp_progress(f < 0.99 ? f : 0.99);
        }
    }
    printf("%llu ", (unsigned long long)nonce);
    for (int i = 0; i < 32; i++) printf("%02x", digest[i]);
    putchar('\n');
    return 0;
}
