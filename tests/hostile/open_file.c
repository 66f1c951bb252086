/* Hostile: tries to read the file named on stdin and print it. */
#include <stdio.h>
#include <string.h>

int main(void) {
    char name[256] = {0};
    if (!fgets(name, sizeof name, stdin)) return 2;
    name[strcspn(name, "\n")] = 0;
    FILE *f = fopen(name, "r");
    if (!f) { puts("open failed"); return 0; }
    char buf[4096];
    size_t n = fread(buf, 1, sizeof buf, f);
    fwrite(buf, 1, n, stdout);
    return 0;
}
