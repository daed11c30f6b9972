// The CUDA kernels (worker/src/tensor/cuda/kernels) run in the emulator of sim.h against naive
// double-precision references, so their indexing, masking, reductions and barriers are checked
// on a machine without a GPU. tests/kernel_emulator.rs makes gen/ (the sources with their three
// PTX conversions in C++), compiles this file with g++ and runs it.
#include "sim.h"
#include "gen/common.cuh"
#include "gen/elementwise.cu"
#include "gen/embedding.cu"
#include "gen/layernorm.cu"
#include "gen/crossentropy.cu"
#include "gen/optimizer.cu"
#include "gen/attention.cu"
#include "gen/llama.cu"
#include <random>
#include <string>

static int failures = 0;
static std::mt19937 rng(1234);
static float uni(float a = -1, float b = 1) { return std::uniform_real_distribution<float>(a, b)(rng); }
static std::vector<float> rand_vec(size_t n, float a = -1, float b = 1) {
    std::vector<float> v(n); for (auto& x : v) x = uni(a, b); return v;
}
static void check(const char* what, const std::vector<float>& got, const std::vector<double>& want,
                  double tol) {
    double worst = 0; size_t at = 0;
    if (got.size() != want.size()) { printf("FAIL %s: size\n", what); failures++; return; }
    for (size_t i = 0; i < got.size(); ++i) {
        double e = fabs(got[i] - want[i]) / (1.0 + fabs(want[i]));
        if (!(e <= worst)) { worst = e; at = i; }
    }
    bool ok = worst <= tol;
    if (!ok) failures++;
    printf("%s %-40s max err %.3g at %zu (got %g want %g)\n", ok ? "ok  " : "FAIL", what, worst,
           at, got.empty() ? 0.0 : got[at], want.empty() ? 0.0 : want[at]);
}
static std::vector<double> to_d(const std::vector<float>& v) { return std::vector<double>(v.begin(), v.end()); }
static dim3 egrid(long n) { return dim3(std::min<long>((n + 255) / 256, 3)); }  // small grid: exercises the stride loop

template <typename T> std::vector<T> store(const std::vector<float>& v) {
    std::vector<T> r(v.size()); for (size_t i = 0; i < v.size(); ++i) r[i] = from_f32<T>(v[i]); return r;
}
template <typename T> std::vector<float> load(const std::vector<T>& v) {
    std::vector<float> r(v.size()); for (size_t i = 0; i < v.size(); ++i) r[i] = to_f32(v[i]); return r;
}

static double gelu_d(double x) { return 0.5 * x * (1 + tanh(0.7978845608 * (x + 0.044715 * x * x * x))); }

void test_elementwise() {
    const long n = 1000;
    std::vector<float> a = rand_vec(n, -4, 4), b = rand_vec(n);
    {
        std::vector<float> d(n);
        launch(fill_f32_entry::fill_f32, egrid(n), dim3(256), d.data(), 2.5f, n);
        check("fill_f32", d, std::vector<double>(n, 2.5), 0);
        std::vector<int> di(n);
        launch(fill_i32, egrid(n), dim3(256), di.data(), 7, n);
        bool ok = std::all_of(di.begin(), di.end(), [](int x) { return x == 7; });
        printf("%s fill_i32\n", ok ? "ok  " : "FAIL"); failures += !ok;
    }
    {
        std::vector<bf16> hb(n); std::vector<f16> hh(n); std::vector<float> back(n);
        launch(convert_f32_to_bf16, egrid(n), dim3(256), hb.data(), (const float*)a.data(), n);
        launch(convert_bf16_to_f16, egrid(n), dim3(256), hh.data(), (const bf16*)hb.data(), n);
        launch(convert_f16_to_f32, egrid(n), dim3(256), back.data(), (const f16*)hh.data(), n);
        check("convert f32->bf16->f16->f32", back, to_d(a), 1.0 / 128);
    }
    {
        std::vector<float> d = a;
        launch(scale_f32_entry::scale_f32, egrid(n), dim3(256), d.data(), 0.5f, n);
        std::vector<double> w(n); for (long i = 0; i < n; ++i) w[i] = a[i] * 0.5;
        check("scale_f32", d, w, 0);
        d = a;
        launch(add_f32_entry::add_f32, egrid(n), dim3(256), d.data(), (const float*)b.data(), n);
        for (long i = 0; i < n; ++i) w[i] = (double)a[i] + b[i];
        check("add_f32", d, w, 1e-7);
        std::vector<float> o(n);
        launch(residual_f32_entry::residual_f32, egrid(n), dim3(256), o.data(), (const float*)a.data(), (const float*)b.data(), n);
        check("residual_f32", o, w, 1e-7);
        launch(gelu_fwd_f32_entry::gelu_fwd_f32, egrid(n), dim3(256), o.data(), (const float*)a.data(), n);
        for (long i = 0; i < n; ++i) w[i] = gelu_d(a[i]);
        check("gelu_fwd_f32", o, w, 1e-6);
        d = b;
        launch(gelu_bwd_f32_entry::gelu_bwd_f32, egrid(n), dim3(256), d.data(), (const float*)a.data(), n);
        for (long i = 0; i < n; ++i) { double h = 1e-4; w[i] = b[i] * (gelu_d(a[i] + h) - gelu_d(a[i] - h)) / (2 * h); }
        check("gelu_bwd_f32", d, w, 1e-5);
    }
}

void test_embedding() {
    const int B = 3, t = 5, c = 300, vp = 10, vocab_start = 5, rows = B * t;
    std::vector<int> tokens(rows);
    for (auto& x : tokens) x = rng() % 20;
    tokens[0] = 7; tokens[4] = 7; tokens[9] = 7;  // repeats
    std::vector<float> wte = rand_vec((size_t)vp * c), wpe = rand_vec((size_t)t * c), out(rows * c);
    launch(embedding_fwd_f32_entry::embedding_fwd_f32, dim3(rows), dim3(256), out.data(), (const int*)tokens.data(),
           (const float*)wte.data(), (const float*)wpe.data(), rows, t, c, vocab_start, vp);
    std::vector<double> w(rows * c);
    for (int r = 0; r < rows; ++r) for (int j = 0; j < c; ++j) {
        int l = tokens[r] - vocab_start;
        w[r * c + j] = (l >= 0 && l < vp ? wte[l * c + j] : 0.0) + wpe[(r % t) * c + j];
    }
    check("embedding_fwd_f32", out, w, 1e-7);
    launch(embedding_fwd_f32_entry::embedding_fwd_f32, dim3(rows), dim3(256), out.data(), (const int*)tokens.data(),
           (const float*)wte.data(), (const float*)nullptr, rows, t, c, vocab_start, vp);
    for (int r = 0; r < rows; ++r) for (int j = 0; j < c; ++j) {
        int l = tokens[r] - vocab_start;
        w[r * c + j] = (l >= 0 && l < vp ? wte[l * c + j] : 0.0);
    }
    check("embedding_fwd_f32 (no wpe)", out, w, 0);

    // Backward: the host's segments (sorted by local row, rows ascending).
    std::vector<float> dout = rand_vec(rows * c), dwte = rand_vec((size_t)vp * c), dwpe = rand_vec((size_t)t * c);
    std::vector<double> wdwte = to_d(dwte), wdwpe = to_d(dwpe);
    std::vector<int> order, seg_start, seg_row;
    for (int l = 0; l < vp; ++l) {
        bool any = false;
        for (int r = 0; r < rows; ++r) if (tokens[r] - vocab_start == l) {
            if (!any) { seg_start.push_back(order.size()); seg_row.push_back(l); any = true; }
            order.push_back(r);
            for (int j = 0; j < c; ++j) wdwte[l * c + j] += dout[r * c + j];
        }
    }
    int segments = seg_row.size();
    seg_start.push_back(order.size());
    launch(embedding_bwd_wte_f32_entry::embedding_bwd_wte_f32, dim3(segments), dim3(256), dwte.data(),
           (const float*)dout.data(), (const int*)order.data(), (const int*)seg_start.data(), (const int*)seg_row.data(), segments, c);
    check("embedding_bwd_wte_f32", dwte, wdwte, 1e-6);
    for (int r = 0; r < rows; ++r) for (int j = 0; j < c; ++j) wdwpe[(r % t) * c + j] += dout[r * c + j];
    launch(embedding_bwd_wpe_f32_entry::embedding_bwd_wpe_f32, egrid((long)t * c), dim3(256), dwpe.data(),
           (const float*)dout.data(), B, t, c);
    check("embedding_bwd_wpe_f32", dwpe, wdwpe, 1e-6);

    // A segment longer than the staged chunk (1024 rows), with c > 256: the reload path.
    {
        const int rows2 = 2500, c2 = 300;
        std::vector<float> dout2 = rand_vec((size_t)rows2 * c2), dw(2 * c2, 0.0f);
        std::vector<int> order2, st2{0}, row2{1};
        for (int r = 0; r < rows2; r += 2) order2.push_back(r);
        st2.push_back(order2.size());
        std::vector<double> want(2 * c2, 0.0);
        for (int r : order2) for (int j = 0; j < c2; ++j) want[c2 + j] += dout2[(size_t)r * c2 + j];
        launch(embedding_bwd_wte_f32_entry::embedding_bwd_wte_f32, dim3(1), dim3(256), dw.data(),
               (const float*)dout2.data(), (const int*)order2.data(), (const int*)st2.data(), (const int*)row2.data(), 1, c2);
        check("embedding_bwd_wte_f32 (long segment)", dw, want, 1e-4);
    }
}

template <typename T>
void test_layernorm(double tol) {
    const int rows = 37, c = 100;
    auto inp = rand_vec(rows * c, -2, 3), weight = rand_vec(c), bias = rand_vec(c);
    for (int j = 0; j < c; ++j) inp[5 * c + j] += 1000;  // a large mean: the two-pass variance matters
    auto inp_t = store<T>(inp), w_t = store<T>(weight), b_t = store<T>(bias);
    inp = load(inp_t); weight = load(w_t); bias = load(b_t);
    std::vector<T> out_t(rows * c);
    std::vector<float> mean(rows), rstd(rows);
    launch(layernorm_fwd<T>, dim3(rows), dim3(256), out_t.data(), mean.data(), rstd.data(), (const T*)inp_t.data(),
           (const T*)w_t.data(), (const T*)b_t.data(), rows, c);
    std::vector<double> wout(rows * c), wmean(rows), wrstd(rows);
    for (int r = 0; r < rows; ++r) {
        double mu = 0, var = 0;
        for (int j = 0; j < c; ++j) mu += inp[r * c + j];
        mu /= c;
        for (int j = 0; j < c; ++j) var += (inp[r * c + j] - mu) * (inp[r * c + j] - mu);
        var /= c;
        wmean[r] = mu; wrstd[r] = 1 / sqrt(var + 1e-5);
        for (int j = 0; j < c; ++j) wout[r * c + j] = (inp[r * c + j] - mu) * wrstd[r] * weight[j] + bias[j];
    }
    std::string n = std::string("layernorm_fwd ") + (sizeof(T) == 4 ? "f32" : "16-bit");
    check((n + " out").c_str(), load(out_t), wout, tol);
    check((n + " mean").c_str(), mean, wmean, 1e-6);
    check((n + " rstd").c_str(), rstd, wrstd, 1e-4);

    auto dout = rand_vec(rows * c), dinp0 = rand_vec(rows * c);
    auto dout_t = store<T>(dout), dinp_t = store<T>(dinp0);
    dout = load(dout_t); dinp0 = load(dinp_t);
    launch(layernorm_bwd_dinp<T>, dim3(rows), dim3(256), dinp_t.data(), (const T*)dout_t.data(), (const T*)inp_t.data(),
           (const T*)w_t.data(), (const float*)mean.data(), (const float*)rstd.data(), rows, c);
    std::vector<double> wdinp(rows * c), wdw(c), wdb(c);
    auto dw0 = rand_vec(c), db0 = rand_vec(c);
    auto dw_t = store<T>(dw0), db_t = store<T>(db0);
    dw0 = load(dw_t); db0 = load(db_t);
    for (int j = 0; j < c; ++j) { wdw[j] = dw0[j]; wdb[j] = db0[j]; }
    for (int r = 0; r < rows; ++r) {
        double a = 0, bsum = 0;
        for (int j = 0; j < c; ++j) {
            double xhat = (inp[r * c + j] - wmean[r]) * wrstd[r], dx = dout[r * c + j] * weight[j];
            a += dx; bsum += dx * xhat;
            wdw[j] += dout[r * c + j] * xhat; wdb[j] += dout[r * c + j];
        }
        a /= c; bsum /= c;
        for (int j = 0; j < c; ++j) {
            double xhat = (inp[r * c + j] - wmean[r]) * wrstd[r], dx = dout[r * c + j] * weight[j];
            wdinp[r * c + j] = dinp0[r * c + j] + (dx - a - xhat * bsum) * wrstd[r];
        }
    }
    check((n + " bwd dinp").c_str(), load(dinp_t), wdinp, tol * 10);
    launch(layernorm_bwd_params<T>, dim3((c + 31) / 32), dim3(32, 16), dw_t.data(), db_t.data(), (const T*)dout_t.data(),
           (const T*)inp_t.data(), (const float*)mean.data(), (const float*)rstd.data(), rows, c);
    check((n + " bwd dweight").c_str(), load(dw_t), wdw, tol * 10);
    check((n + " bwd dbias").c_str(), load(db_t), wdb, tol * 10);
    auto acc_t = store<T>(db0);
    std::vector<double> wacc(c);
    for (int j = 0; j < c; ++j) { wacc[j] = db0[j]; for (int r = 0; r < rows; ++r) wacc[j] += dout[r * c + j]; }
    launch(colsum_add<T>, dim3((c + 31) / 32), dim3(32, 16), acc_t.data(), (const T*)dout_t.data(), rows, c);
    check((n + " colsum_add").c_str(), load(acc_t), wacc, tol * 10);
}

void test_crossentropy() {
    const int rows = 3, v = 50, vp = 64;
    auto logits = rand_vec(rows * vp, -3, 3);
    std::vector<int> targets = {3, 49, 20};
    float dloss = 0.25f;
    std::vector<double> wloss(rows), wgrad(rows * vp, 0.0);
    for (int r = 0; r < rows; ++r) {
        double m = -1e30, s = 0;
        for (int j = 0; j < v; ++j) m = std::max(m, (double)logits[r * vp + j]);
        for (int j = 0; j < v; ++j) s += exp(logits[r * vp + j] - m);
        wloss[r] = m + log(s) - logits[r * vp + targets[r]];
        for (int j = 0; j < v; ++j) wgrad[r * vp + j] = (exp(logits[r * vp + j] - m) / s - (j == targets[r])) * dloss;
    }
    auto l = logits;
    std::vector<float> loss(rows), mx(rows), se(rows);
    launch(crossentropy_fwd_bwd_f32_entry::crossentropy_fwd_bwd_f32, dim3(rows), dim3(1024), l.data(), loss.data(), mx.data(),
           se.data(), (const int*)targets.data(), dloss, rows, v, vp);
    check("crossentropy_fwd_bwd loss", loss, wloss, 1e-6);
    check("crossentropy_fwd_bwd dlogits", l, wgrad, 1e-6);

    // Two ranks of 32 columns: ids 0..32 and 32..64 (real 32 and 18).
    std::vector<std::vector<float>> shard(2, std::vector<float>(rows * 32));
    for (int k = 0; k < 2; ++k) for (int r = 0; r < rows; ++r) for (int j = 0; j < 32; ++j)
        shard[k][r * 32 + j] = logits[r * vp + k * 32 + j];
    int real[2] = {32, 18};
    std::vector<float> maxs[2] = {std::vector<float>(rows), std::vector<float>(rows)};
    for (int k = 0; k < 2; ++k)
        launch(crossentropy_max_f32_entry::crossentropy_max_f32, dim3(rows), dim3(1024), (const float*)shard[k].data(), maxs[k].data(), rows, 32, real[k]);
    std::vector<float> gmax(rows);
    for (int r = 0; r < rows; ++r) gmax[r] = std::max(maxs[0][r], maxs[1][r]);
    std::vector<float> picked[2] = {std::vector<float>(rows), std::vector<float>(rows)}, sums[2] = {std::vector<float>(rows), std::vector<float>(rows)};
    for (int k = 0; k < 2; ++k)
        launch(crossentropy_sumexp_f32_entry::crossentropy_sumexp_f32, dim3(rows), dim3(1024), (const float*)shard[k].data(), picked[k].data(),
               (const float*)gmax.data(), sums[k].data(), (const int*)targets.data(), rows, 32, real[k], 32 * k);
    std::vector<float> tl(rows), ts(rows);
    for (int r = 0; r < rows; ++r) { tl[r] = picked[0][r] + picked[1][r]; ts[r] = sums[0][r] + sums[1][r]; }
    std::vector<float> full(rows * vp);
    for (int k = 0; k < 2; ++k) {
        auto losses = tl;
        launch(crossentropy_finish_f32_entry::crossentropy_finish_f32, dim3(rows), dim3(1024), shard[k].data(), losses.data(),
               (const float*)gmax.data(), (const float*)ts.data(), (const int*)targets.data(), dloss, rows, 32, real[k], 32 * k);
        if (k == 0) check("crossentropy split loss", losses, wloss, 1e-6);
        for (int r = 0; r < rows; ++r) for (int j = 0; j < 32; ++j) full[r * vp + k * 32 + j] = shard[k][r * 32 + j];
    }
    check("crossentropy split dlogits", full, wgrad, 1e-6);
}

void test_optimizer() {
    const long n = 1001;
    auto g = rand_vec(n);
    std::vector<float> partials(8, -1.0f);
    long block_len = (n + 7) / 8; int used = (n + block_len - 1) / block_len;
    launch(sum_squares_f32_entry::sum_squares_f32, dim3(used), dim3(256), (const float*)g.data(), partials.data(), n, block_len, used);
    std::vector<double> want(8, -1.0);
    for (int i = 0; i < used; ++i) { want[i] = 0; for (long k = i * block_len; k < std::min(n, (i + 1) * block_len); ++k) want[i] += (double)g[k] * g[k]; }
    check("sum_squares_f32", partials, want, 1e-7);

    float lr = 1e-3f, b1 = 0.9f, b2 = 0.95f, eps = 1e-8f, wd = 0.1f, bc1 = 0.1f, bc2 = 0.05f, gs = 0.5f;
    auto p0 = rand_vec(n), m0 = rand_vec(n, 0, 0.1f), v0 = rand_vec(n, 0, 0.01f);
    auto step = [&](float p, float gg, float& m, float& v) {
        gg = gg * gs; m = b1 * m + (1 - b1) * gg; v = b2 * v + (1 - b2) * gg * gg;
        float mh = m / bc1, vh = v / bc2; p = p - lr * wd * p; return p - lr * mh / (sqrtf(vh) + eps);
    };
    // grad given, no master: f32 bits must match the CPU's.
    auto p = p0, m = m0, v = v0;
    launch(adamw_f32_entry::adamw_f32, egrid(n), dim3(256), p.data(), (float*)nullptr, m.data(), v.data(), (const float*)g.data(), n,
           lr, b1, b2, eps, wd, bc1, bc2, gs);
    int mismatches = 0;
    { auto pm = m0, pv = v0; for (long i = 0; i < n; ++i) { float w = step(p0[i], g[i], pm[i], pv[i]); mismatches += memcmp(&w, &p[i], 4) != 0 || pm[i] != m[i] || pv[i] != v[i]; } }
    printf("%s adamw_f32 bitwise vs CPU order (%d mismatches)\n", mismatches ? "FAIL" : "ok  ", mismatches); failures += mismatches != 0;
    // grad null, master given, bf16 param carrying the gradient.
    auto pb = store<bf16>(g); std::vector<float> master = p0; m = m0; v = v0;
    launch(adamw_bf16_entry::adamw_bf16, egrid(n), dim3(256), pb.data(), master.data(), m.data(), v.data(), (const bf16*)nullptr, n,
           lr, b1, b2, eps, wd, bc1, bc2, gs);
    mismatches = 0;
    { auto pm = m0, pv = v0; for (long i = 0; i < n; ++i) { float gi = to_f32(from_f32<bf16>(g[i])); float w = step(p0[i], gi, pm[i], pv[i]);
        mismatches += memcmp(&w, &master[i], 4) != 0 || pb[i].bits != from_f32<bf16>(w).bits; } }
    printf("%s adamw_bf16 master, grad in param (%d mismatches)\n", mismatches ? "FAIL" : "ok  ", mismatches); failures += mismatches != 0;
}

// Grouped-query attention when nkv < nh: qkv rows are [q: nh hs | k: nkv hs | v: nkv hs] and
// query head h reads key/value head h / (nh / nkv); the reference sums dk, dv over each group.
template <typename T>
void test_attention(int B, int t, int nh, int nkv, int hs, double tol) {
    const long W = (long)nh * hs, S = (long)(nh + 2 * nkv) * hs, rows = (long)B * t;
    const int group = nh / nkv;
    auto qkv = rand_vec(rows * S, -1.5, 1.5), dout = rand_vec(rows * W);
    auto qkv_t = store<T>(qkv), dout_t = store<T>(dout);
    qkv = load(qkv_t); dout = load(dout_t);
    std::vector<T> out_t(rows * W), dqkv_t(rows * S);
    std::vector<float> lse(rows * nh), delta(rows * nh);
    dim3 grid((t + 63) / 64, nh, B), kv_grid((t + 63) / 64, nkv, B);
    launch(attention_fwd<T>, grid, dim3(256), out_t.data(), lse.data(), (const T*)qkv_t.data(), B, t, nh, nkv, hs);
    launch(attention_bwd_delta<T>, egrid(rows * nh), dim3(256), delta.data(), (const T*)dout_t.data(), (const T*)out_t.data(), (int)rows, nh, hs);
    // Poison dqkv: the two backward kernels must overwrite all of it.
    for (auto& x : dqkv_t) x = from_f32<T>(12345.0f);
    launch(attention_bwd_dkv<T>, kv_grid, dim3(256), dqkv_t.data(), (const T*)qkv_t.data(), (const T*)dout_t.data(),
           (const float*)lse.data(), (const float*)delta.data(), B, t, nh, nkv, hs);
    launch(attention_bwd_dq<T>, grid, dim3(256), dqkv_t.data(), (const T*)qkv_t.data(), (const T*)dout_t.data(),
           (const float*)lse.data(), (const float*)delta.data(), B, t, nh, nkv, hs);

    std::vector<double> wout(rows * W), wlse(rows * nh), wdelta(rows * nh), wd(rows * S, 0.0);
    const double scale = 1 / sqrt((double)hs);
    auto Q = [&](int b, int i, int h, int d) { return (double)qkv[((long)b * t + i) * S + h * hs + d]; };
    auto K = [&](int b, int i, int h, int d) { return (double)qkv[((long)b * t + i) * S + W + (h / group) * hs + d]; };
    auto V = [&](int b, int i, int h, int d) { return (double)qkv[((long)b * t + i) * S + W + (long)(nkv + h / group) * hs + d]; };
    auto G = [&](int b, int i, int h, int d) { return (double)dout[((long)b * t + i) * W + h * hs + d]; };
    for (int b = 0; b < B; ++b) for (int h = 0; h < nh; ++h) {
        std::vector<double> P(t * t, 0.0), dS(t * t, 0.0);
        for (int i = 0; i < t; ++i) {
            double m = -1e300; std::vector<double> s(i + 1);
            for (int j = 0; j <= i; ++j) { double x = 0; for (int d = 0; d < hs; ++d) x += Q(b, i, h, d) * K(b, j, h, d); s[j] = x * scale; m = std::max(m, s[j]); }
            double sum = 0; for (int j = 0; j <= i; ++j) sum += exp(s[j] - m);
            double l = m + log(sum);
            wlse[((long)b * t + i) * nh + h] = l;
            for (int j = 0; j <= i; ++j) P[i * t + j] = exp(s[j] - l);
            for (int d = 0; d < hs; ++d) { double o = 0; for (int j = 0; j <= i; ++j) o += P[i * t + j] * V(b, j, h, d); wout[((long)b * t + i) * W + h * hs + d] = o; }
            double dl = 0; for (int d = 0; d < hs; ++d) dl += G(b, i, h, d) * wout[((long)b * t + i) * W + h * hs + d];
            wdelta[((long)b * t + i) * nh + h] = dl;
            for (int j = 0; j <= i; ++j) { double dp = 0; for (int d = 0; d < hs; ++d) dp += G(b, i, h, d) * V(b, j, h, d); dS[i * t + j] = P[i * t + j] * (dp - dl) * scale; }
        }
        for (int i = 0; i < t; ++i) for (int d = 0; d < hs; ++d) {
            double dq = 0, dk = 0, dv = 0;
            for (int j = 0; j <= i; ++j) dq += dS[i * t + j] * K(b, j, h, d);
            for (int k = i; k < t; ++k) { dk += dS[k * t + i] * Q(b, k, h, d); dv += P[k * t + i] * G(b, k, h, d); }
            long row = ((long)b * t + i) * S;
            wd[row + h * hs + d] = dq;
            wd[row + W + (h / group) * hs + d] += dk;
            wd[row + W + (long)(nkv + h / group) * hs + d] += dv;
        }
    }
    char name[128], heads[32] = "";
    if (nkv != nh) snprintf(heads, sizeof heads, " nkv%d", nkv);
    const char* ty = sizeof(T) == 4 ? "f32" : "bf16";
    snprintf(name, sizeof name, "attention %s b%d t%d nh%d%s hs%d out", ty, B, t, nh, heads, hs); check(name, load(out_t), wout, tol);
    snprintf(name, sizeof name, "attention %s b%d t%d nh%d%s hs%d lse", ty, B, t, nh, heads, hs); check(name, lse, wlse, 1e-5);
    snprintf(name, sizeof name, "attention %s b%d t%d nh%d%s hs%d delta", ty, B, t, nh, heads, hs); check(name, delta, wdelta, tol);
    snprintf(name, sizeof name, "attention %s b%d t%d nh%d%s hs%d dqkv", ty, B, t, nh, heads, hs); check(name, load(dqkv_t), wd, tol * 4);
    // Decoding: row `pos` of every sequence from the kept q|k|v equals that row of the forward.
    for (int pos : {0, t / 2, t - 1}) {
        std::vector<T> dec_t(B * W);
        launch(decode_attention<T>, dim3(B * nh), dim3(128), dec_t.data(), (const T*)qkv_t.data(), t, nh, nkv, hs, pos);
        std::vector<double> want(B * W);
        for (int b = 0; b < B; ++b) for (long k = 0; k < W; ++k) want[b * W + k] = wout[((long)b * t + pos) * W + k];
        snprintf(name, sizeof name, "decode_attention %s b%d t%d nh%d%s hs%d pos%d", ty, B, t, nh, heads, hs, pos);
        check(name, load(dec_t), want, tol);
    }
}

template <typename T>
void test_rmsnorm(double tol) {
    const int rows = 37, c = 300;  // c > 256: the block strides over the row
    const float eps = 1e-5f;
    auto inp = rand_vec(rows * c, -2, 3), weight = rand_vec(c);
    for (int j = 0; j < c; ++j) inp[3 * c + j] *= 1e-3f;  // a small row: eps matters
    auto inp_t = store<T>(inp), w_t = store<T>(weight);
    inp = load(inp_t); weight = load(w_t);
    std::vector<T> out_t(rows * c);
    std::vector<float> rstd(rows);
    launch(rmsnorm_fwd<T>, dim3(rows), dim3(256), out_t.data(), rstd.data(), (const T*)inp_t.data(),
           (const T*)w_t.data(), rows, c, eps);
    std::vector<double> wout(rows * c), wrstd(rows);
    for (int r = 0; r < rows; ++r) {
        double ms = 0;
        for (int j = 0; j < c; ++j) ms += (double)inp[r * c + j] * inp[r * c + j];
        wrstd[r] = 1 / sqrt(ms / c + eps);
        for (int j = 0; j < c; ++j) wout[r * c + j] = inp[r * c + j] * wrstd[r] * weight[j];
    }
    std::string n = std::string("rmsnorm ") + (sizeof(T) == 4 ? "f32" : "bf16");
    check((n + " out").c_str(), load(out_t), wout, tol);
    check((n + " rstd").c_str(), rstd, wrstd, 1e-5);

    auto dout = rand_vec(rows * c), dinp0 = rand_vec(rows * c), dw0 = rand_vec(c);
    auto dout_t = store<T>(dout), dinp_t = store<T>(dinp0), dw_t = store<T>(dw0);
    dout = load(dout_t); dinp0 = load(dinp_t); dw0 = load(dw_t);
    launch(rmsnorm_bwd_dinp<T>, dim3(rows), dim3(256), dinp_t.data(), (const T*)dout_t.data(), (const T*)inp_t.data(),
           (const T*)w_t.data(), (const float*)rstd.data(), rows, c);
    launch(rmsnorm_bwd_weight<T>, dim3((c + 31) / 32), dim3(32, 16), dw_t.data(), (const T*)dout_t.data(),
           (const T*)inp_t.data(), (const float*)rstd.data(), rows, c);
    // d/dx of sum(dout * x r w) with r = (mean(x^2) + eps)^-1/2: r (dout w) - x r^3 mean(dout w x).
    std::vector<double> wdinp(rows * c), wdw(dw0.begin(), dw0.end());
    for (int r = 0; r < rows; ++r) {
        double m = 0, s = wrstd[r];
        for (int j = 0; j < c; ++j) m += (double)dout[r * c + j] * weight[j] * inp[r * c + j];
        m /= c;
        for (int j = 0; j < c; ++j) {
            wdinp[r * c + j] = dinp0[r * c + j] + s * dout[r * c + j] * weight[j] - inp[r * c + j] * s * s * s * m;
            wdw[j] += (double)dout[r * c + j] * inp[r * c + j] * s;
        }
    }
    check((n + " bwd dinp").c_str(), load(dinp_t), wdinp, tol * 10);
    check((n + " bwd dweight").c_str(), load(dw_t), wdw, tol * 10);
}

// Rotary embeddings on q and k heads of a GQA layout (nh 4, nkv 2); v untouched, and the backward
// undoes the forward.
template <typename T>
void test_rope(double tol) {
    const int B = 2, t = 7, nh = 4, nkv = 2, hs = 16, half = hs / 2, t_max = 9;
    const long S = (long)(nh + 2 * nkv) * hs, rows = (long)B * t;
    std::vector<float> table(t_max * hs);
    for (int p = 0; p < t_max; ++p) for (int j = 0; j < half; ++j) {
        double angle = p * pow(10000.0, -2.0 * j / hs);
        table[p * hs + j] = cos(angle); table[p * hs + half + j] = sin(angle);
    }
    auto x = rand_vec(rows * S);
    auto x_t = store<T>(x);
    x = load(x_t);
    long pairs = rows * (nh + nkv) * half;
    launch(rope_fwd<T>, egrid(pairs), dim3(256), x_t.data(), (const float*)table.data(), (int)rows, t, nh, nkv, hs);
    std::vector<double> want(x.begin(), x.end());
    for (long r = 0; r < rows; ++r) for (int h = 0; h < nh + nkv; ++h) for (int j = 0; j < half; ++j) {
        int p = r % t;
        double angle = p * pow(10000.0, -2.0 * j / hs), a = x[r * S + h * hs + j], b = x[r * S + h * hs + half + j];
        want[r * S + h * hs + j] = a * cos(angle) - b * sin(angle);
        want[r * S + h * hs + half + j] = b * cos(angle) + a * sin(angle);
    }
    std::string n = std::string("rope ") + (sizeof(T) == 4 ? "f32" : "bf16");
    check((n + " fwd").c_str(), load(x_t), want, tol);
    launch(rope_bwd<T>, egrid(pairs), dim3(256), x_t.data(), (const float*)table.data(), (int)rows, t, nh, nkv, hs);
    check((n + " bwd of fwd").c_str(), load(x_t), to_d(x), tol * 2);
}

template <typename T>
void test_swiglu(double tol) {
    const int rows = 5, f = 301;
    const long n = (long)rows * f;
    auto inp = rand_vec(n * 2, -6, 6), dout = rand_vec(n);
    auto inp_t = store<T>(inp), dout_t = store<T>(dout);
    inp = load(inp_t); dout = load(dout_t);
    std::vector<T> out_t(n), dinp_t(n * 2, from_f32<T>(12345.0f));
    launch(swiglu_fwd<T>, egrid(n), dim3(256), out_t.data(), (const T*)inp_t.data(), n, f);
    launch(swiglu_bwd<T>, egrid(n), dim3(256), dinp_t.data(), (const T*)dout_t.data(), (const T*)inp_t.data(), n, f);
    std::vector<double> wout(n), wd(n * 2);
    auto silu = [](double g) { return g / (1 + exp(-g)); };
    for (int r = 0; r < rows; ++r) for (int j = 0; j < f; ++j) {
        double g = inp[r * 2 * f + j], u = inp[r * 2 * f + f + j], dy = dout[r * f + j], h = 1e-4;
        wout[r * f + j] = silu(g) * u;
        wd[r * 2 * f + j] = dy * u * (silu(g + h) - silu(g - h)) / (2 * h);
        wd[r * 2 * f + f + j] = dy * silu(g);
    }
    std::string nm = std::string("swiglu ") + (sizeof(T) == 4 ? "f32" : "bf16");
    check((nm + " fwd").c_str(), load(out_t), wout, tol);
    check((nm + " bwd").c_str(), load(dinp_t), wd, tol * 4);
}

int main(int argc, char** argv) {
    bool attention_only = argc > 1;
    if (!attention_only) {
        test_elementwise();
        test_embedding();
        test_layernorm<float>(1e-4);  // row 5 has mean ~1000: f32 x - mean loses ~6e-5
        test_layernorm<bf16>(1.0 / 64);
        test_crossentropy();
        test_optimizer();
        test_rmsnorm<float>(1e-5);
        test_rmsnorm<bf16>(1.0 / 64);
        test_rope<float>(1e-6);
        test_rope<bf16>(1.0 / 64);
        test_swiglu<float>(1e-6);
        test_swiglu<bf16>(1.0 / 64);
    }
    test_attention<float>(2, 70, 2, 2, 32, 1e-5);
    test_attention<float>(1, 130, 1, 1, 80, 1e-5);
    test_attention<float>(1, 64, 2, 2, 128, 1e-5);
    test_attention<float>(1, 3, 1, 1, 64, 1e-5);
    test_attention<float>(1, 65, 1, 1, 96, 1e-5);
    test_attention<bf16>(1, 70, 1, 1, 64, 1.0 / 64);
    // Grouped-query attention: nh / nkv = 2 and 4, across a partial key tile.
    test_attention<float>(1, 70, 4, 2, 32, 1e-5);
    test_attention<float>(2, 67, 4, 1, 64, 1e-5);
    test_attention<bf16>(1, 70, 4, 2, 64, 1.0 / 64);
    printf(failures ? "%d FAILURES\n" : "all passed\n", failures);
    return failures != 0;
}
