/*
 * The hash puzzle as an OpenCL kernel: the same answers as examples/hash-puzzle/puzzle.c.
 *
 * Each launch ("round") tries the nonces round * N .. round * N + N - 1, N = the global size;
 * work-item i tries round * N + i. A solution sets out[0] = 1 and keeps the smallest nonce of
 * the round as its bitwise complement in out[1] (atomic_max of ~nonce: no initial value needed).
 * The runtime launches rounds until out[0] is set, so the first solution found is the smallest.
 * The prefix is the datum (trailing newlines ignored, at most 100 bytes).
 */
__constant uint K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

#define ROTR(x, n) rotate((uint)(x), (uint)(32 - (n)))

static void compress(uint h[8], const uchar *block) {
    uint w[64];
    for (int i = 0; i < 16; i++)
        w[i] = (uint)block[4 * i] << 24 | (uint)block[4 * i + 1] << 16 |
               (uint)block[4 * i + 2] << 8 | (uint)block[4 * i + 3];
    for (int i = 16; i < 64; i++) {
        uint s0 = ROTR(w[i - 15], 7) ^ ROTR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint s1 = ROTR(w[i - 2], 17) ^ ROTR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    uint a = h[0], b = h[1], c = h[2], d = h[3], e = h[4], f = h[5], g = h[6], hh = h[7];
    for (int i = 0; i < 64; i++) {
        uint t1 = hh + (ROTR(e, 6) ^ ROTR(e, 11) ^ ROTR(e, 25)) + ((e & f) ^ (~e & g)) + K[i] + w[i];
        uint t2 = (ROTR(a, 2) ^ ROTR(a, 13) ^ ROTR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

__kernel void search(__global const uchar *prefix, const uint prefix_len, const uint difficulty,
                     const uint round, __global volatile uint *out) {
    uint len = prefix_len > 100 ? 100 : prefix_len;
    while (len > 0 && (prefix[len - 1] == '\n' || prefix[len - 1] == '\r')) len--;
    const uint nonce = round * (uint)get_global_size(0) + (uint)get_global_id(0);

    uchar msg[128];
    for (uint i = 0; i < len; i++) msg[i] = prefix[i];
    /* decimal digits of the nonce, as snprintf("%llu") writes them */
    uchar digits[10];
    uint n = nonce, count = 0;
    do { digits[count++] = (uchar)('0' + n % 10); n /= 10; } while (n);
    for (uint i = 0; i < count; i++) msg[len + i] = digits[count - 1 - i];
    uint total = len + count;

    uint blocks = total + 9 <= 64 ? 1 : 2;
    for (uint i = total; i < blocks * 64; i++) msg[i] = 0;
    msg[total] = 0x80;
    ulong bits = (ulong)total * 8;
    for (int j = 0; j < 8; j++) msg[blocks * 64 - 1 - j] = (uchar)(bits >> (8 * j));

    uint h[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
    for (uint blk = 0; blk < blocks; blk++) compress(h, msg + 64 * blk);

    uint zeros = 0;
    for (int i = 0; i < 8; i++) {
        if (h[i] == 0) { zeros += 32; continue; }
        zeros += clz(h[i]);
        break;
    }
    if (zeros >= difficulty) {
        atomic_max(&out[1], ~nonce);
        atomic_xchg(&out[0], 1u);
    }
}
