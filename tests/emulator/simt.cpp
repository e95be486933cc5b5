// The SIMT runtime of the emulated CUDA device (simt.h): fibers, the block scheduler, shared memory
// and the launch checks of the CUDA runtime.
//
// Schedule: the blocks of a grid run in a shuffled order; within a block, every fiber runs until it
// reaches __syncthreads() or returns, one after another in an order shuffled again at every barrier.
// The shuffles come from the schedule seed (set_schedule_seed) and a launch counter, so a kernel
// whose result depends on the order of its threads or blocks (a race, a missing barrier) gives
// different results under different seeds, and poisoned shared memory makes a read before the write
// visible as NaN.
//
// Static shared memory: a kernel's __shared__ variables are its function-local statics; the runtime
// finds them, and so the kernel's static shared bytes, in the symbol table of the library holding the
// kernel (their mangled names are "_ZZ" + the kernel's encoding + "E" + the variable's name).
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <c10/util/Exception.h>

#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "emulator.h"
#include "simt.h"

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace lorafa::emu {

Builtins builtins;

namespace {

// ---- fibers ----------------------------------------------------------------------------------------

constexpr size_t kStackBytes = 128 * 1024;  // UBSan's reports need room

struct Fiber {
  enum State { kRunnable, kAtBarrier, kDone };
  unsigned char* stack = nullptr;  // kStackBytes, below a guard page
  State state = kRunnable;
  uint3 thread_idx{};
#if defined(__x86_64__)
  void* sp = nullptr;
#else
  ucontext_t context;
#endif
};

std::vector<std::unique_ptr<Fiber>> fibers;  // reused across launches; one per thread of the block
Fiber* running = nullptr;
const Launch* active = nullptr;

#if defined(__x86_64__)
// switch_to(save, load): saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save, and resumes the context whose stack pointer is
// load (System V x86-64: everything else is caller-saved, so a call boundary is a complete switch).
extern "C" void lorafa_emu_switch(void** save, void* load);
asm(R"(
.pushsection .text
.globl lorafa_emu_switch
.type lorafa_emu_switch, @function
lorafa_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
.size lorafa_emu_switch, .-lorafa_emu_switch
.popsection
)");

void* scheduler_sp = nullptr;

[[noreturn]] void fiber_main() {
  active->thread_main(active->args);
  running->state = Fiber::kDone;
  lorafa_emu_switch(&running->sp, scheduler_sp);
  __builtin_unreachable();
}

// A fresh context on f's stack that starts in fiber_main, laid out as lorafa_emu_switch leaves one.
void start(Fiber& f) {
  auto* top = reinterpret_cast<uint64_t*>(f.stack + kStackBytes);  // 16-byte aligned
  top[-1] = 0;                                           // fiber_main's (never used) return address
  top[-2] = reinterpret_cast<uint64_t>(&fiber_main);    // popped by ret: fiber_main's rsp % 16 == 8
  for (int i = 3; i <= 8; ++i) top[-i] = 0;              // rbp rbx r12 r13 r14 r15
  top[-9] = 0x037F00001F80ull;                           // MXCSR 0x1F80, x87 control word 0x037F
  f.sp = top - 9;
}

void resume(Fiber& f) { lorafa_emu_switch(&scheduler_sp, f.sp); }
void yield() { lorafa_emu_switch(&running->sp, scheduler_sp); }
#else
// Portable fallback: ucontext (slower: glibc's swapcontext makes a sigprocmask call per switch).
ucontext_t scheduler_context;

void fiber_main() {
  active->thread_main(active->args);
  running->state = Fiber::kDone;
}

void start(Fiber& f) {
  getcontext(&f.context);
  f.context.uc_stack.ss_sp = f.stack;
  f.context.uc_stack.ss_size = kStackBytes;
  f.context.uc_link = &scheduler_context;
  makecontext(&f.context, fiber_main, 0);
}

void resume(Fiber& f) { swapcontext(&scheduler_context, &f.context); }
void yield() { swapcontext(&running->context, &scheduler_context); }
#endif

Fiber& fiber(size_t i) {
  while (fibers.size() <= i) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(mem != MAP_FAILED, "lorafa emulator: cannot map a fiber stack");
    mprotect(mem, page, PROT_NONE);  // guard page below the stack
    auto f = std::make_unique<Fiber>();
    f->stack = static_cast<unsigned char*>(mem) + page;
    fibers.push_back(std::move(f));
  }
  return *fibers[i];
}

// ---- schedule --------------------------------------------------------------------------------------

uint64_t schedule_seed = 0;
uint64_t launch_count = 0;
bool dry_run = false;

uint64_t splitmix64(uint64_t& state) {
  uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

template <typename T>
void shuffle(std::vector<T>& v, uint64_t& state) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[splitmix64(state) % i]);
}

// ---- kernels: names and static shared memory -------------------------------------------------------

struct SharedVar {
  unsigned char* address;
  size_t bytes;
};

struct KernelInfo {
  std::string name;  // demangled
  std::vector<SharedVar> shared;
  size_t static_smem = 0;  // as the CUDA runtime counts it: each variable naturally aligned
};

// Symbols of one loaded library, from its .symtab.
struct Library {
  std::map<uintptr_t, std::string> functions;                // address -> mangled name
  std::map<std::string, std::vector<SharedVar>> locals;     // "_ZZ<encoding>E" -> its statics
};

std::string demangle(const std::string& mangled) {
  int status = 0;
  char* s = abi::__cxa_demangle(mangled.c_str(), nullptr, nullptr, &status);
  std::string out = status == 0 && s != nullptr ? s : mangled;
  std::free(s);
  return out;
}

// The functions and the local statics (grouped by every "_ZZ...E" prefix of their names, one of
// which is the enclosing function's) of the library at `path`, loaded at `base`.
Library read_library(const char* path, uintptr_t base) {
  Library lib;
  const int fd = open(path, O_RDONLY);
  TORCH_CHECK(fd >= 0, "lorafa emulator: cannot open ", path);
  struct stat st;
  fstat(fd, &st);
  void* map = mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  TORCH_CHECK(map != MAP_FAILED, "lorafa emulator: cannot map ", path);
  const auto* data = static_cast<const unsigned char*>(map);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(data);
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(data + eh->e_shoff);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const auto* syms = reinterpret_cast<const Elf64_Sym*>(data + sh[i].sh_offset);
    const char* names = reinterpret_cast<const char*>(data + sh[sh[i].sh_link].sh_offset);
    const size_t count = sh[i].sh_size / sizeof(Elf64_Sym);
    for (size_t k = 0; k < count; ++k) {
      const Elf64_Sym& s = syms[k];
      if (s.st_shndx == SHN_UNDEF || s.st_value == 0) continue;
      const std::string name = names + s.st_name;
      if (ELF64_ST_TYPE(s.st_info) == STT_FUNC) {
        lib.functions.emplace(base + s.st_value, name);
      } else if (ELF64_ST_TYPE(s.st_info) == STT_OBJECT && name.rfind("_ZZ", 0) == 0) {
        for (size_t e = name.find('E', 3); e != std::string::npos; e = name.find('E', e + 1)) {
          auto& vars = lib.locals[name.substr(0, e + 1)];
          auto* address = reinterpret_cast<unsigned char*>(base + s.st_value);
          bool seen = false;
          for (const auto& v : vars) seen = seen || v.address == address;
          if (!seen) vars.push_back({address, static_cast<size_t>(s.st_size)});
        }
      }
    }
  }
  munmap(map, static_cast<size_t>(st.st_size));
  return lib;
}

const KernelInfo& kernel_info(const void* kernel) {
  static std::map<const void*, KernelInfo> kernels;
  static std::map<std::string, Library> libraries;
  auto it = kernels.find(kernel);
  if (it != kernels.end()) return it->second;
  Dl_info dl{};
  TORCH_CHECK(dladdr(kernel, &dl) != 0 && dl.dli_fname != nullptr,
              "lorafa emulator: cannot find the library of a kernel");
  auto lib = libraries.find(dl.dli_fname);
  if (lib == libraries.end()) {
    lib = libraries
              .emplace(dl.dli_fname,
                       read_library(dl.dli_fname, reinterpret_cast<uintptr_t>(dl.dli_fbase)))
              .first;
  }
  const auto fn = lib->second.functions.find(reinterpret_cast<uintptr_t>(kernel));
  TORCH_CHECK(fn != lib->second.functions.end() && fn->second.rfind("_Z", 0) == 0,
              "lorafa emulator: the kernel at ", kernel, " has no C++ symbol in ", dl.dli_fname,
              " (its static shared memory cannot be found)");
  KernelInfo info;
  info.name = demangle(fn->second);
  const auto vars = lib->second.locals.find("_ZZ" + fn->second.substr(2) + "E");
  if (vars != lib->second.locals.end()) info.shared = vars->second;
  for (const auto& v : info.shared) {
    const size_t align = std::min<size_t>(16, v.bytes & (~v.bytes + 1));  // natural alignment
    info.static_smem = (info.static_smem + align - 1) / align * align + v.bytes;
  }
  return kernels.emplace(kernel, std::move(info)).first->second;
}

// ---- launch checks ---------------------------------------------------------------------------------

std::string describe(const Launch& l, const KernelInfo& k) {
  return c10::str("emulated launch of ", k.name, ": grid (", l.grid.x, ", ", l.grid.y, ", ",
                  l.grid.z, "), block (", l.block.x, ", ", l.block.y, ", ", l.block.z, "), ",
                  k.static_smem, " bytes of static and ", l.dynamic_smem,
                  " bytes of dynamic shared memory, __launch_bounds__ ", l.max_threads);
}

void check_launch(const Launch& l, const KernelInfo& k) {
  const uint64_t threads = uint64_t(l.block.x) * l.block.y * l.block.z;
  const bool block_ok = l.block.x >= 1 && l.block.y >= 1 && l.block.z >= 1 && l.block.x <= 1024 &&
                        l.block.y <= 1024 && l.block.z <= 64 && threads <= 1024;
  const bool grid_ok = l.grid.x >= 1 && l.grid.y >= 1 && l.grid.z >= 1 &&
                       l.grid.x <= 2147483647u && l.grid.y <= 65535 && l.grid.z <= 65535;
  TORCH_CHECK(block_ok && grid_ok, "CUDA error: invalid configuration argument (", describe(l, k),
              ")");
  TORCH_CHECK(threads <= static_cast<uint64_t>(l.max_threads),
              "CUDA error: too many resources requested for launch (", describe(l, k), ")");
  // The dynamic region starts 16-byte aligned after the static variables.
  const size_t smem = (k.static_smem + 15) / 16 * 16 + l.dynamic_smem;
  TORCH_CHECK(smem <= kMaxSharedBytesPerBlock, "CUDA error: invalid argument (", describe(l, k),
              "; at most ", kMaxSharedBytesPerBlock, " bytes without cudaFuncSetAttribute)");
  TORCH_CHECK(l.stream == emulated_stream(),
              "lorafa emulator: a kernel was launched on a stream other than the current one (",
              describe(l, k), ")");
}

std::vector<unsigned char>& dynamic_buffer() {
  static std::vector<unsigned char> buffer(kMaxSharedBytesPerBlock + 16);
  return buffer;
}

unsigned char* dynamic_base() {
  auto& b = dynamic_buffer();
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(b.data()) + 15) / 16 * 16);
}

std::mutex device_mutex;  // one grid at a time

}  // namespace

void syncthreads() {
  TORCH_INTERNAL_ASSERT(running != nullptr, "__syncthreads() outside a kernel");
  running->state = Fiber::kAtBarrier;
  yield();
}

unsigned char* dynamic_smem() { return dynamic_base(); }

void run(const Launch& l) {
  std::lock_guard<std::mutex> lock(device_mutex);
  const KernelInfo& k = kernel_info(l.kernel);
  check_launch(l, k);
  ++launch_count;
  if (dry_run) return;
  uint64_t rng = schedule_seed * 0x9E3779B97F4A7C15ull + launch_count;
  const unsigned nthreads = l.block.x * l.block.y * l.block.z;
  std::vector<uint3> blocks;
  blocks.reserve(size_t(l.grid.x) * l.grid.y * l.grid.z);
  for (unsigned z = 0; z < l.grid.z; ++z)
    for (unsigned y = 0; y < l.grid.y; ++y)
      for (unsigned x = 0; x < l.grid.x; ++x) blocks.push_back({x, y, z});
  shuffle(blocks, rng);
  std::vector<unsigned> order(nthreads);
  active = &l;
  builtins.block_dim = l.block;
  builtins.grid_dim = l.grid;
  for (const uint3& b : blocks) {
    builtins.block_idx = b;
    for (const auto& v : k.shared) std::memset(v.address, 0xFF, v.bytes);
    std::memset(dynamic_base(), 0xFF, l.dynamic_smem);
    for (unsigned t = 0; t < nthreads; ++t) {
      Fiber& f = fiber(t);
      f.state = Fiber::kRunnable;
      f.thread_idx = {t % l.block.x, (t / l.block.x) % l.block.y, t / (l.block.x * l.block.y)};
      start(f);
    }
    for (;;) {
      order.clear();
      for (unsigned t = 0; t < nthreads; ++t) {
        if (fibers[t]->state != Fiber::kDone) order.push_back(t);
      }
      if (order.empty()) break;
      shuffle(order, rng);
      for (unsigned t : order) {
        Fiber& f = *fibers[t];
        f.state = Fiber::kRunnable;
        builtins.thread_idx = f.thread_idx;
        running = &f;
        resume(f);
      }
      running = nullptr;
      unsigned waiting = 0;
      for (unsigned t : order) waiting += fibers[t]->state == Fiber::kAtBarrier;
      if (waiting != 0 && waiting != nthreads) {
        active = nullptr;
        TORCH_CHECK(false, "lorafa emulator: __syncthreads() reached by ", waiting, " of the ",
                    nthreads, " threads of block (", b.x, ", ", b.y, ", ", b.z,
                    "); the others returned (", describe(l, k), ")");
      }
    }
  }
  active = nullptr;
}

void set_schedule_seed(uint64_t seed) { schedule_seed = seed; }
void set_dry_run(bool on) { dry_run = on; }
bool dry_run_enabled() { return dry_run; }
uint64_t launches() { return launch_count; }

}  // namespace lorafa::emu
