/* One tile of the Mandelbrot set: the iteration count (scaled to 0..255) of each pixel. */
__kernel void tile(const float x0, const float y0, const float step, const uint max_iter,
                   const uint width, __global uchar *out) {
    const uint px = get_global_id(0), py = get_global_id(1);
    const float cx = x0 + px * step, cy = y0 + py * step;
    float x = 0.0f, y = 0.0f;
    uint i = 0;
    while (i < max_iter && x * x + y * y <= 4.0f) {
        float t = x * x - y * y + cx;
        y = 2.0f * x * y + cy;
        x = t;
        i++;
    }
    out[py * width + px] = (uchar)(i >= max_iter ? 255 : (i * 254) / max_iter);
}
