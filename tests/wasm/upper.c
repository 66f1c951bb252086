/* A work function written without this project's helpers: upper-cases its datum and
 * appends its first argument. Built by Debian's clang + wasi-libc in the tests, to show that
 * a module from another standard wasm32-wasi toolchain runs unchanged. */
#include <ctype.h>
#include <stdio.h>

int main(int argc, char **argv) {
    int c;
    while ((c = getchar()) != EOF) putchar(toupper(c));
    printf("|%s", argc > 1 ? argv[1] : "");
    return 0;
}
