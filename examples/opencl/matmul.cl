/* C = A x B for square n x n matrices of floats, one work-item per element of C. */
__kernel void matmul(__global const float *a, __global const float *b, __global float *c,
                     const uint n) {
    const uint row = get_global_id(0), col = get_global_id(1);
    float sum = 0.0f;
    for (uint k = 0; k < n; k++) sum += a[row * n + k] * b[k * n + col];
    c[row * n + col] = sum;
}
