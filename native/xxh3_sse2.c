/* XXH3-128, baseline x86-64 (SSE2). */
#define BF_XXH3_FN bf_xxh3_128_sse2
#include "xxh3_impl.h"
