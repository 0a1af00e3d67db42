// Pack step on the GPU: gather the selected token rows of a captured tensor, cast them to the
// storage dtype and write them into a ring slice, optionally as byte planes (HDF5 shuffle
// order: byte b of every element in plane b) -- one pass over the data. With group_rows = R the
// planes are laid out per group of R rows (one HDF5 chunk each): group g holds rows
// [g*R, min((g+1)*R, rows)) as [itemsize, rows_g * F], so every chunk is one contiguous run.
// Rows whose width is a multiple of 4 (every hidden size in practice); other widths take the
// torch path. ``pack_copy`` also queues the slice's copy to pinned host memory on a side
// stream, with the events that order it, in the same call.
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
                                int64_t F, int64_t s0, int64_t s1, int64_t group_rows, uint8_t* __restrict__ out) {
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
      // plane stride and offset within this row's group (one group when group_rows == 0)
      int64_t base = 0, plane = n, e = e0;
      if (group_rows > 0) {
        const int64_t gi = r / group_rows;
        const int64_t first = gi * group_rows;
        const int64_t rows_g = min(group_rows, rows - first);
        base = first * F * S;
        plane = rows_g * F;
        e = e0 - first * F;
      }
#pragma unroll
      for (int b = 0; b < S; ++b) {
        uint32_t word = 0;
#pragma unroll
        for (int k = 0; k < VEC; ++k) word |= (uint32_t)((v[k] >> (8 * b)) & 0xFF) << (8 * k);
        *reinterpret_cast<uint32_t*>(out + base + (int64_t)b * plane + e) = word;
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
            int64_t group_rows, cudaStream_t stream) {
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
    pack_vec_kernel<In, Out, true><<<blocks, threads, 0, stream>>>(xp, index, rows, F, s0, s1, group_rows, op);
  else
    pack_vec_kernel<In, Out, false><<<blocks, threads, 0, stream>>>(xp, index, rows, F, s0, s1, 0, op);
  (void)S;
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename In>
void dispatch_out(const torch::Tensor& x, const int64_t* index, int64_t rows, int64_t F, torch::Tensor& out,
                  bool shuffle, int64_t group_rows, at::ScalarType out_dtype, cudaStream_t stream) {
  switch (out_dtype) {
    case at::kFloat: launch<In, float>(x, index, rows, F, out, shuffle, group_rows, stream); break;
    case at::kHalf: launch<In, c10::Half>(x, index, rows, F, out, shuffle, group_rows, stream); break;
    case at::kBFloat16: launch<In, c10::BFloat16>(x, index, rows, F, out, shuffle, group_rows, stream); break;
    default: TORCH_CHECK(false, "pack: storage dtype must be float32, float16 or bfloat16, got ", out_dtype);
  }
}

}  // namespace

// x: [tokens, F] CUDA (float32 / float16 / bfloat16, any strides); index: [rows] int64 CUDA
// (used when has_index); out_code: 0 float32, 1 float16, 2 bfloat16; out: uint8 CUDA,
// rows * F * itemsize bytes; group_rows: 0 for one group of planes, else rows per group.
void pack_rows(torch::Tensor x, torch::Tensor index, bool has_index, int64_t out_code, torch::Tensor out,
               bool shuffle, int64_t group_rows) {
  TORCH_CHECK(x.is_cuda() && out.is_cuda(), "pack: x and out must be CUDA tensors");
  TORCH_CHECK(x.dim() == 2, "pack: x must be [tokens, F], got ", x.dim(), " dims");
  TORCH_CHECK(out.scalar_type() == at::kByte && out.is_contiguous(), "pack: out must be contiguous uint8");
  TORCH_CHECK(reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0, "pack: out must be 16-byte aligned");
  TORCH_CHECK(out_code >= 0 && out_code <= 2, "pack: out_code must be 0, 1 or 2");
  TORCH_CHECK(group_rows >= 0, "pack: group_rows must be >= 0, got ", group_rows);
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
    case at::kFloat: dispatch_out<float>(x, ip, rows, F, out, shuffle, group_rows, out_dtype, stream); break;
    case at::kHalf: dispatch_out<c10::Half>(x, ip, rows, F, out, shuffle, group_rows, out_dtype, stream); break;
    case at::kBFloat16:
      dispatch_out<c10::BFloat16>(x, ip, rows, F, out, shuffle, group_rows, out_dtype, stream);
      break;
    default: TORCH_CHECK(false, "pack: input dtype must be float32, float16 or bfloat16, got ", x.scalar_type());
  }
}

// One hook's whole GPU step in one call (no Python in between, the GIL held throughout):
// pack x's rows [tokens, F] into ring[offset : offset + nbytes] on the current stream, record
// ``packed`` there, make the side stream wait for it, copy the slice to ``host_ptr`` (pinned)
// on the side stream and record ``copied`` there. Events and streams are raw handles.
void pack_copy(torch::Tensor x, int64_t tokens, c10::optional<torch::Tensor> index, int64_t out_code,
               torch::Tensor ring, int64_t offset, int64_t nbytes, bool shuffle, int64_t group_rows, int64_t host_ptr,
               int64_t side_stream, int64_t packed_event, int64_t copied_event) {
  TORCH_CHECK(ring.is_cuda() && ring.scalar_type() == at::kByte && ring.dim() == 1, "pack_copy: ring must be 1-D uint8");
  TORCH_CHECK(offset >= 0 && nbytes >= 0 && offset + nbytes <= ring.numel(), "pack_copy: slice out of the ring");
  auto x2 = x.dim() == 2 && x.size(0) == tokens ? x : x.reshape({tokens, -1});
  auto out = ring.narrow(0, offset, nbytes);
  const bool has_index = index.has_value();
  auto idx = has_index ? index.value() : torch::Tensor();
  if (has_index && !idx.is_contiguous()) idx = idx.contiguous();
  if (!has_index) idx = torch::empty({0}, ring.options().dtype(at::kLong));
  pack_rows(x2, idx, has_index, out_code, out, shuffle, group_rows);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t cur = c10::cuda::getCurrentCUDAStream(x.get_device()).stream();
  auto side = reinterpret_cast<cudaStream_t>(side_stream);
  auto packed = reinterpret_cast<cudaEvent_t>(packed_event);
  auto copied = reinterpret_cast<cudaEvent_t>(copied_event);
  C10_CUDA_CHECK(cudaEventRecord(packed, cur));
  C10_CUDA_CHECK(cudaStreamWaitEvent(side, packed, 0));
  if (nbytes)
    C10_CUDA_CHECK(cudaMemcpyAsync(reinterpret_cast<void*>(host_ptr), out.data_ptr(), nbytes, cudaMemcpyDeviceToHost,
                                   side));
  C10_CUDA_CHECK(cudaEventRecord(copied, side));
}

int64_t event_create() {
  cudaEvent_t e;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return reinterpret_cast<int64_t>(e);
}

void event_synchronize(int64_t e) { C10_CUDA_CHECK(cudaEventSynchronize(reinterpret_cast<cudaEvent_t>(e))); }

void event_destroy(int64_t e) { C10_CUDA_CHECK(cudaEventDestroy(reinterpret_cast<cudaEvent_t>(e))); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("pack_rows", &pack_rows, "gather rows, cast, and optionally byte-shuffle into a uint8 buffer");
  m.def("pack_copy", &pack_copy, "pack into a ring slice and queue its copy to pinned host memory");
  m.def("event_create", &event_create, "a CUDA event without timing, as a raw handle");
  m.def("event_synchronize", &event_synchronize, "wait for an event (the GIL is released)",
        pybind11::call_guard<pybind11::gil_scoped_release>());
  m.def("event_destroy", &event_destroy, "destroy an event made by event_create");
}
