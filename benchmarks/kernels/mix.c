/* A CoreMark-like mix (not CoreMark itself, whose run rules we do not follow): linked-list
 * search and reversal, a small integer matrix kernel, a state machine over a byte stream,
 * and a CRC-16 over their results, iterated; prints the final CRC. usage: mix ITERATIONS */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct node { struct node *next; int32_t value; int32_t index; } node;

static uint16_t crc16(uint16_t crc, uint32_t data) {
    for (int i = 0; i < 32; i++) {
        uint16_t bit = (uint16_t)((crc ^ data) & 1);
        data >>= 1;
        crc = (uint16_t)((crc >> 1) ^ (bit ? 0xA001 : 0));
    }
    return crc;
}

static node *reverse(node *head) {
    node *prev = NULL;
    while (head) {
        node *next = head->next;
        head->next = prev;
        prev = head;
        head = next;
    }
    return prev;
}

static int32_t list_work(node *head, int32_t seed) {
    int32_t found = 0;
    for (int q = 0; q < 8; q++) {
        int32_t want = (seed + q * 37) & 255;
        for (node *n = head; n; n = n->next)
            if ((n->value & 255) == want) { found += n->index; break; }
    }
    return found;
}

#define M 24
static int32_t matrix_work(int16_t *a, int16_t *b, int32_t *c, int16_t seed) {
    for (int i = 0; i < M * M; i++) a[i] = (int16_t)(a[i] + seed);
    for (int i = 0; i < M; i++)
        for (int j = 0; j < M; j++) {
            int32_t s = 0;
            for (int k = 0; k < M; k++) s += (int32_t)a[i * M + k] * b[k * M + j];
            c[i * M + j] = s;
        }
    int32_t acc = 0;
    for (int i = 0; i < M * M; i++) acc += (c[i] >> 2) & 0x7f;
    return acc;
}

enum { START, INT, FLOAT, EXP, INVALID };
static int32_t state_work(const char *s) {
    int counts[5] = {0};
    int state = START;
    for (; *s; s++) {
        char ch = *s;
        if (ch == ',') { counts[state]++; state = START; continue; }
        switch (state) {
        case START: state = (ch >= '0' && ch <= '9') ? INT : (ch == '.' ? FLOAT : INVALID); break;
        case INT: state = (ch >= '0' && ch <= '9') ? INT : (ch == '.' ? FLOAT : INVALID); break;
        case FLOAT: state = (ch >= '0' && ch <= '9') ? FLOAT : (ch == 'e' ? EXP : INVALID); break;
        case EXP: state = (ch >= '0' && ch <= '9') ? EXP : INVALID; break;
        default: break;
        }
    }
    return counts[INT] * 3 + counts[FLOAT] * 5 + counts[EXP] * 7 + counts[INVALID];
}

int main(int argc, char **argv) {
    long iterations = argc > 1 ? atol(argv[1]) : 1000;
    enum { NODES = 400 };
    node *nodes = malloc(sizeof(node) * NODES);
    int16_t *a = malloc(sizeof(int16_t) * M * M), *b = malloc(sizeof(int16_t) * M * M);
    int32_t *c = malloc(sizeof(int32_t) * M * M);
    if (!nodes || !a || !b || !c) return 1;
    for (int i = 0; i < NODES; i++) {
        nodes[i].next = i + 1 < NODES ? &nodes[i + 1] : NULL;
        nodes[i].value = (i * 7919) ^ 0x5a5a;
        nodes[i].index = i;
    }
    for (int i = 0; i < M * M; i++) { a[i] = (int16_t)(i % 11); b[i] = (int16_t)(i % 13 - 6); }
    static const char stream[] =
        "123,4.56,7e8,.9,10.1e2,abc,42,3.14159,0.5e1,x1,17,2.71828e0,99,1.,5e,";
    node *head = nodes;
    uint16_t crc = 0;
    for (long it = 0; it < iterations; it++) {
        crc = crc16(crc, (uint32_t)list_work(head, (int32_t)it));
        head = reverse(head);
        crc = crc16(crc, (uint32_t)matrix_work(a, b, c, (int16_t)(it & 3)));
        crc = crc16(crc, (uint32_t)state_work(stream));
    }
    printf("%u\n", crc);
    return 0;
}
