/* Parse JSON: a document of n records (numbers, strings with escapes, nested arrays and
 * objects) is generated once, then parsed `repeat` times by a small recursive-descent
 * parser that sums the numbers and string lengths; prints the checksum.
 * usage: json N REPEAT */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *p;
static double total;
static long chars;

static void ws(void) {
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r') p++;
}

static int value(int depth);

static int string(void) {
    p++; /* the quote */
    while (*p != '"') {
        if (*p == '\0') return -1;
        if (*p == '\\') {
            p++;
            if (*p == 'u') p += 4;
            else p++;
        } else {
            p++;
        }
        chars++;
    }
    p++;
    return 0;
}

static int number(void) {
    char *end;
    double d = strtod(p, &end);
    if (end == p) return -1;
    total += d;
    p = end;
    return 0;
}

static int value(int depth) {
    if (depth > 64) return -1;
    ws();
    switch (*p) {
    case '{':
        p++;
        ws();
        if (*p == '}') { p++; return 0; }
        for (;;) {
            ws();
            if (*p != '"' || string()) return -1;
            ws();
            if (*p++ != ':') return -1;
            if (value(depth + 1)) return -1;
            ws();
            if (*p == ',') { p++; continue; }
            if (*p == '}') { p++; return 0; }
            return -1;
        }
    case '[':
        p++;
        ws();
        if (*p == ']') { p++; return 0; }
        for (;;) {
            if (value(depth + 1)) return -1;
            ws();
            if (*p == ',') { p++; continue; }
            if (*p == ']') { p++; return 0; }
            return -1;
        }
    case '"':
        return string();
    case 't': p += 4; return 0;
    case 'f': p += 5; return 0;
    case 'n': p += 4; return 0;
    default:
        return number();
    }
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 20000;
    int repeat = argc > 2 ? atoi(argv[2]) : 1;
    size_t cap = (size_t)n * 160 + 16, len = 0;
    char *doc = malloc(cap);
    if (!doc) return 1;
    len += sprintf(doc + len, "[");
    for (long i = 0; i < n; i++) {
        len += sprintf(doc + len,
                       "%s{\"id\": %ld, \"name\": \"item \\\"%ld\\\"\", \"price\": %ld.%02ld, "
                       "\"tags\": [\"a\", \"b\\u00e9\", %ld], \"ok\": %s, \"next\": null}",
                       i ? ", " : "", i, i, i % 997, i % 100, i % 7, i % 2 ? "true" : "false");
    }
    len += sprintf(doc + len, "]");
    double check = 0;
    for (int r = 0; r < repeat; r++) {
        total = 0;
        chars = 0;
        p = doc;
        if (value(0)) return 2;
        check += total + chars;
    }
    printf("%.2f %zu\n", check, len);
    return 0;
}
