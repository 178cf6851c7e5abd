// pipar: the command-line trainer (placeholder until the trainer lands).
#include <cstdio>
int main() { std::puts("pipar"); return 0; }
