// Softmax cross-entropy with accuracy, and SGD over parameter lists.
#include "runtime/loss.h"

namespace pipar {

void softmax_cross_entropy_queued(const Tensor& logits, const Tensor& labels, float scale, Tensor& losses, Tensor& probs,
                                  Tensor* dlogits, StreamRef s) {
  const Shape4 ls = logits.shape();
  auto fit = [&](Tensor& t, Shape4 shape) {
    if (!t.defined() || !(t.shape() == shape)) t = Tensor::empty(shape, logits.device());
  };
  fit(probs, ls);
  fit(losses, {ls.n, 1, 1, 1});
  kernels::softmax_cross_entropy_forward(logits.view(), labels.iview(), probs.view(), losses.view(), s);
  if (dlogits) {
    fit(*dlogits, ls);
    kernels::softmax_cross_entropy_backward(probs.view(), labels.iview(), scale, dlogits->view(), s);
  }
}

LossStats softmax_cross_entropy(const Tensor& logits, const Tensor& labels, float scale, Tensor* dlogits, StreamRef s) {
  Tensor losses, probs;
  softmax_cross_entropy_queued(logits, labels, scale, losses, probs, dlogits, s);
  return loss_stats(losses, probs, labels);
}

LossStats loss_stats(const Tensor& losses, const Tensor& probs, const Tensor& labels) {
  // Statistics on the host (a small [n] and [n, k] copy on CUDA).
  const Shape4 ls = probs.shape();
  PIPAR_CHECK(losses.numel() == ls.n && labels.numel() == ls.n, "loss_stats: ", losses.shape().str(), " losses, ",
              ls.str(), " probabilities, ", labels.shape().str(), " labels");
  const std::vector<float> l = losses.to_vector();
  const std::vector<float> p = probs.to_vector();
  const std::vector<int32_t> y = labels.to_ivector();
  return loss_stats_rows(l.data(), p.data(), y.data(), ls.per_sample(), 0, ls.n, 1);
}

LossStats loss_stats_rows(const float* losses, const float* probs, const int32_t* labels, int64_t classes, int64_t first,
                          int64_t count, int64_t step) {
  LossStats st;
  for (int64_t r = 0, i = first; r < count; ++r, i += step) {
    st.loss_sum += losses[i];
    const float* p = probs + i * classes;
    int64_t best = 0;
    for (int64_t j = 1; j < classes; ++j)
      if (p[j] > p[best]) best = j;
    st.correct += best == labels[i];
  }
  st.count = count;
  return st;
}

void Sgd::step(const std::vector<Param*>& params, StreamRef s) {
  for (Param* p : params) kernels::sgd_step(params_for(*p), p->value.view(), p->grad.view(), p->momentum.view(), s);
}

void Sgd::zero_grad(const std::vector<Param*>& params) {
  for (Param* p : params) p->grad.zero();
}

}  // namespace pipar
