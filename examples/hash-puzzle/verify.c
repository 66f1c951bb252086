/*
 * Verifier of the hash puzzle, a WASI command run by the scheduler before it pays.
 *
 * argv:   argv[1] = the datum's length in bytes; argv[2] = D (the job's argv[0])
 * stdin:  the datum (the prefix) immediately followed by the result ("<nonce> <hash hex>\n")
 * exit:   0 when SHA-256(prefix || nonce) is the hash given and has >= D leading zero bits;
 *         1 when the result is wrong; 2 when the input is malformed.
 */
#include <stdio.h>
#include <stdlib.h>

#include "sha256.h"

int main(int argc, char **argv) {
    if (argc < 3) { fputs("usage: verify DATUM_LENGTH D\n", stderr); return 2; }
    size_t datum_len = (size_t)strtoul(argv[1], NULL, 10);
    int difficulty = atoi(argv[2]);
    static uint8_t input[4096 + 256];
    size_t len = fread(input, 1, sizeof input - 1, stdin);
    if (!feof(stdin) || datum_len > len || datum_len > 4096) { fputs("bad input\n", stderr); return 2; }
    size_t prefix_len = datum_len;
    while (prefix_len > 0 && (input[prefix_len - 1] == '\n' || input[prefix_len - 1] == '\r')) prefix_len--;

    input[len] = 0;
    const char *result = (const char *)input + datum_len;
    unsigned long long nonce;
    char claimed[65];
    if (sscanf(result, "%llu %64s", &nonce, claimed) != 2) { fputs("result unreadable\n", stderr); return 1; }

    static uint8_t msg[4096 + 32];
    memcpy(msg, input, prefix_len);
    int n = snprintf((char *)msg + prefix_len, 32, "%llu", nonce);
    uint8_t digest[32];
    sha256(msg, prefix_len + (size_t)n, digest);
    char hex[65];
    for (int i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", digest[i]);
    if (strcmp(hex, claimed) != 0) { fputs("hash does not match the nonce\n", stderr); return 1; }
    if (leading_zero_bits(digest) < difficulty) { fputs("too few leading zero bits\n", stderr); return 1; }
    return 0;
}
