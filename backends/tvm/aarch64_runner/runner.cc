// Runs a graphcomp artifact's model.so with the TVM runtime alone, without Python.
//
// Usage: runner MODEL_SO OUT_DIR ARG.npy...
//   Loads MODEL_SO, creates its Relax VM on CPU 0 with the pooled allocator, calls "main"
//   with the .npy files in order (the inputs, then the weights) and writes output i to
//   OUT_DIR/output_<i>.npy. Reads only C-order, little-endian .npy files of version 1 or 2.
//   Exit code 0 on success, 1 with a message on stderr otherwise.
//
// It is built for aarch64 with the tvm_ffi headers only, because the TVM wheel's own
// runtime headers include files the wheel does not ship.

#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr int kPooledAllocator = 2;  // tvm.runtime.vm.VirtualMachine.POOLED_ALLOCATOR
constexpr size_t kAlignment = 64;    // TVM's kernels assume 64-byte aligned buffers

struct AlignedAlloc {
  void AllocData(DLTensor* tensor) {
    size_t bytes = (ffi::GetDataSize(*tensor) + kAlignment - 1) / kAlignment * kAlignment;
    tensor->data = std::aligned_alloc(kAlignment, bytes == 0 ? kAlignment : bytes);
  }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

size_t Bytes(const ffi::Tensor& tensor) {
  return ffi::GetDataSize(static_cast<size_t>(tensor.numel()), tensor.dtype());
}

// Maps a .npy type string such as "<f4" or "|b1" to a DLPack data type.
DLDataType ParseDescr(const std::string& descr) {
  const std::string message = "unsupported .npy dtype '" + descr +
                              "'; expected little-endian bool, int, uint or float";
  if (descr.size() < 3 || descr[0] == '>') throw std::runtime_error(message);
  int bits = std::stoi(descr.substr(2)) * 8;
  switch (descr[1]) {
    case 'f': return DLDataType{kDLFloat, static_cast<uint8_t>(bits), 1};
    case 'i': return DLDataType{kDLInt, static_cast<uint8_t>(bits), 1};
    case 'u': return DLDataType{kDLUInt, static_cast<uint8_t>(bits), 1};
    case 'b': return DLDataType{kDLBool, 8, 1};
  }
  throw std::runtime_error(message);
}

std::string FormatDescr(DLDataType dtype) {
  const char* kinds[] = {"i", "u", "f"};
  if (dtype.code == kDLBool) return "|b1";
  if (dtype.code > kDLFloat || dtype.lanes != 1) {
    throw std::runtime_error("unsupported output dtype: DLPack type code " +
                             std::to_string(dtype.code) + " with " +
                             std::to_string(dtype.lanes) + " lanes");
  }
  return std::string(dtype.bits == 8 ? "|" : "<") + kinds[dtype.code] +
         std::to_string(dtype.bits / 8);
}

// Returns the text between `key` and the next `end` in a .npy header.
std::string Field(const std::string& header, const std::string& key, char end) {
  size_t at = header.find(key);
  if (at == std::string::npos) throw std::runtime_error("no " + key + " in header");
  at += key.size();
  return header.substr(at, header.find(end, at) - at);
}

ffi::Tensor ReadNpy(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  char preamble[10];
  if (!file.read(preamble, 10) || std::memcmp(preamble, "\x93NUMPY", 6) != 0) {
    throw std::runtime_error(path + ": cannot open, or not a .npy file");
  }
  uint32_t length = static_cast<uint8_t>(preamble[8]) | static_cast<uint8_t>(preamble[9]) << 8;
  if (preamble[6] >= 2) {  // version 2 has a 4-byte header length
    char more[2];
    file.read(more, 2);
    length |= static_cast<uint8_t>(more[0]) << 16 | static_cast<uint32_t>(more[1]) << 24;
  }
  std::string header(length, '\0');
  file.read(header.data(), length);
  if (Field(header, "'fortran_order': ", ',') != "False") {
    throw std::runtime_error(path + ": Fortran-order arrays are not supported");
  }
  std::vector<int64_t> shape;
  std::istringstream dims(Field(header, "'shape': (", ')'));
  for (std::string dim; std::getline(dims, dim, ',');) {
    if (dim.find_first_not_of(' ') != std::string::npos) shape.push_back(std::stoll(dim));
  }
  DLDataType dtype = ParseDescr(Field(header, "'descr': '", '\''));
  ffi::Tensor tensor = ffi::Tensor::FromNDAlloc(
      AlignedAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype, DLDevice{kDLCPU, 0});
  if (!file.read(static_cast<char*>(tensor.data_ptr()), Bytes(tensor))) {
    throw std::runtime_error(path + ": truncated file, shorter than its header states");
  }
  return tensor;
}

void WriteNpy(const std::string& path, const ffi::Tensor& tensor) {
  if (!tensor.IsContiguous()) throw std::runtime_error(path + ": output is not contiguous");
  std::string shape;
  for (int64_t dim : tensor.shape()) shape += std::to_string(dim) + ", ";
  std::string header = "{'descr': '" + FormatDescr(tensor.dtype()) +
                       "', 'fortran_order': False, 'shape': (" + shape + "), }";
  header.append(63 - (10 + header.size()) % 64, ' ').push_back('\n');  // pad to 64 bytes
  std::ofstream file(path, std::ios::binary);
  uint16_t length = static_cast<uint16_t>(header.size());
  file.write("\x93NUMPY\x01\x00", 8);
  file.put(static_cast<char>(length & 0xff)).put(static_cast<char>(length >> 8));
  file << header;
  const char* data = static_cast<const char*>(tensor.data_ptr());
  file.write(data + tensor.GetDLTensorPtr()->byte_offset, Bytes(tensor));
  if (!file) throw std::runtime_error(path + ": write failed");
}

ffi::Function RequireFunction(const ffi::Module& module, const std::string& name) {
  ffi::Optional<ffi::Function> function = module->GetFunction(name);
  if (!function.has_value()) throw std::runtime_error("function '" + name + "' not found");
  return function.value();
}

int Run(int argc, char** argv) {
  ffi::Module library = ffi::Module::LoadFromFile(argv[1]);
  ffi::Module vm = RequireFunction(library, "vm_load_executable")().cast<ffi::Module>();
  RequireFunction(vm, "vm_initialization")(static_cast<int>(kDLCPU), 0, kPooledAllocator);

  std::vector<ffi::Tensor> tensors;
  for (int i = 3; i < argc; ++i) tensors.push_back(ReadNpy(argv[i]));
  std::vector<ffi::AnyView> args(tensors.begin(), tensors.end());
  ffi::Any result;
  RequireFunction(vm, "main").CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);

  std::vector<ffi::Tensor> outputs;
  if (auto single = result.try_cast<ffi::Tensor>()) {
    outputs.push_back(*single);
  } else {
    for (const ffi::Any& item : result.cast<ffi::Array<ffi::Any>>()) {
      outputs.push_back(item.cast<ffi::Tensor>());
    }
  }
  for (size_t i = 0; i < outputs.size(); ++i) {
    WriteNpy(std::string(argv[2]) + "/output_" + std::to_string(i) + ".npy", outputs[i]);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " MODEL_SO OUT_DIR ARG.npy...\n";
    return 1;
  }
  try {
    return Run(argc, argv);
  } catch (const std::exception& error) {
    std::cerr << "runner: " << error.what() << "\n";
    return 1;
  }
}
