// Pack step on the GPU: gather the selected token rows of a captured tensor, cast them to the
// storage dtype and write them into a ring slice, optionally as byte planes (HDF5 shuffle
// order: byte b of every element in plane b) -- one pass over the data. Rows whose width is a
// multiple of 4 (every hidden size in practice); other widths take the torch path.
//
// Bytes must equal lightning_llm_inst/buffer/pack.py::pack_rows_torch on the same device:
// casts go through c10::Half / c10::BFloat16, exactly as torch's own CUDA casts do.

#include <torch/extension.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace {

template <typename T>
struct Bits;
template <>
struct Bits<float> { using type = uint32_t; };
template <>
struct Bits<c10::Half> { using type = uint16_t; };
template <>
struct Bits<c10::BFloat16> { using type = uint16_t; };

// The storage bits of ``v`` cast to Out: the same element gives the same bits as torch's
// own CUDA cast (which goes through float for half <-> bfloat16).
template <typename Out, typename In>
__device__ __forceinline__ typename Bits<Out>::type to_bits(In v) {
  typename Bits<Out>::type b;
  if constexpr (std::is_same<In, Out>::value) {
    memcpy(&b, &v, sizeof(b));
  } else {
    Out o = static_cast<Out>(static_cast<float>(v));
    memcpy(&b, &o, sizeof(b));
  }
  return b;
}

constexpr int VEC = 4;  // elements per thread on the vector path

// One thread: VEC consecutive elements of one row (F % VEC == 0). Planes are written as one
// VEC-byte word per plane; row-major output as one VEC * itemsize word.
template <typename In, typename Out, bool Shuffle>
__global__ void pack_vec_kernel(const In* __restrict__ x, const int64_t* __restrict__ index, int64_t rows,
                                int64_t F, int64_t s0, int64_t s1, uint8_t* __restrict__ out) {
  using B = typename Bits<Out>::type;
  constexpr int S = sizeof(B);
  const int64_t n = rows * F;
  const int64_t groups = n / VEC;
  for (int64_t g = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; g < groups; g += (int64_t)gridDim.x * blockDim.x) {
    const int64_t e0 = g * VEC;
    const int64_t r = e0 / F;
    const int64_t c = e0 - r * F;
    const int64_t src_row = index ? index[r] : r;
    const In* src = x + src_row * s0 + c * s1;
    B v[VEC];
#pragma unroll
    for (int k = 0; k < VEC; ++k) v[k] = to_bits<Out, In>(src[k * s1]);
    if (Shuffle) {
#pragma unroll
      for (int b = 0; b < S; ++b) {
        uint32_t word = 0;
#pragma unroll
        for (int k = 0; k < VEC; ++k) word |= (uint32_t)((v[k] >> (8 * b)) & 0xFF) << (8 * k);
        *reinterpret_cast<uint32_t*>(out + (int64_t)b * n + e0) = word;
      }
    } else {
      if (S == 2) {
        uint2 w;
        w.x = (uint32_t)v[0] | ((uint32_t)v[1] << 16);
        w.y = (uint32_t)v[2] | ((uint32_t)v[3] << 16);
        *reinterpret_cast<uint2*>(out + e0 * S) = w;
      } else {
        uint4 w;
        w.x = (uint32_t)v[0];
        w.y = (uint32_t)v[1];
        w.z = (uint32_t)v[2];
        w.w = (uint32_t)v[3];
        *reinterpret_cast<uint4*>(out + e0 * S) = w;
      }
    }
  }
}

template <typename In, typename Out>
void launch(const torch::Tensor& x, const int64_t* index, int64_t rows, int64_t F, torch::Tensor& out, bool shuffle,
            cudaStream_t stream) {
  const int64_t n = rows * F;
  if (n == 0) return;
  const int threads = 256;
  const int64_t s0 = x.stride(0), s1 = x.stride(1);
  const auto* xp = x.data_ptr<In>();
  auto* op = out.data_ptr<uint8_t>();
  constexpr int S = sizeof(typename Bits<Out>::type);
  const int64_t work = n / VEC;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, x.get_device()));
  const int blocks = (int)std::min<int64_t>((work + threads - 1) / threads, (int64_t)sms * 32);
  if (shuffle)
    pack_vec_kernel<In, Out, true><<<blocks, threads, 0, stream>>>(xp, index, rows, F, s0, s1, op);
  else
    pack_vec_kernel<In, Out, false><<<blocks, threads, 0, stream>>>(xp, index, rows, F, s0, s1, op);
  (void)S;
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename In>
void dispatch_out(const torch::Tensor& x, const int64_t* index, int64_t rows, int64_t F, torch::Tensor& out,
                  bool shuffle, at::ScalarType out_dtype, cudaStream_t stream) {
  switch (out_dtype) {
    case at::kFloat: launch<In, float>(x, index, rows, F, out, shuffle, stream); break;
    case at::kHalf: launch<In, c10::Half>(x, index, rows, F, out, shuffle, stream); break;
    case at::kBFloat16: launch<In, c10::BFloat16>(x, index, rows, F, out, shuffle, stream); break;
    default: TORCH_CHECK(false, "pack: storage dtype must be float32, float16 or bfloat16, got ", out_dtype);
  }
}

}  // namespace

// x: [tokens, F] CUDA (float32 / float16 / bfloat16, any strides); index: [rows] int64 CUDA
// (used when has_index); out_code: 0 float32, 1 float16, 2 bfloat16; out: uint8 CUDA,
// rows * F * itemsize bytes.
void pack_rows(torch::Tensor x, torch::Tensor index, bool has_index, int64_t out_code, torch::Tensor out,
               bool shuffle) {
  TORCH_CHECK(x.is_cuda() && out.is_cuda(), "pack: x and out must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2, "pack: x must be [tokens, F], got ", x.dim(), " dims");
  TORCH_CHECK(out.scalar_type() == at::kByte && out.is_contiguous(), "pack: out must be contiguous uint8");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0, "pack: out must be 16-byte aligned");
  TORCH_CHECK(out_code >= 0 && out_code <= 2, "pack: out_code must be 0, 1 or 2");
  const at::ScalarType codes[3] = {at::kFloat, at::kHalf, at::kBFloat16};
  const auto out_dtype = codes[out_code];
  const int64_t rows = has_index ? index.numel() : x.size(0);
  const int64_t F = x.size(1);
  TORCH_CHECK(F % VEC == 0, "pack: the row width must be a multiple of ", VEC, ", got ", F);
  const int64_t need = rows * F * c10::elementSize(out_dtype);
  TORCH_CHECK(out.numel() == need, "pack: out has ", out.numel(), " bytes, needs ", need);
  const int64_t* ip = nullptr;
  if (has_index) {
    TORCH_CHECK(index.is_cuda() && index.scalar_type() == at::kLong && index.is_contiguous(),
                "pack: index must be a contiguous int64 CUDA tensor");
    ip = index.data_ptr<int64_t>();
  }
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  switch (x.scalar_type()) {
    case at::kFloat: dispatch_out<float>(x, ip, rows, F, out, shuffle, out_dtype, stream); break;
    case at::kHalf: dispatch_out<c10::Half>(x, ip, rows, F, out, shuffle, out_dtype, stream); break;
    case at::kBFloat16: dispatch_out<c10::BFloat16>(x, ip, rows, F, out, shuffle, out_dtype, stream); break;
    default: TORCH_CHECK(false, "pack: input dtype must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_rows", &pack_rows, "gather rows, cast, and optionally byte-shuffle into a uint8 buffer");
}
