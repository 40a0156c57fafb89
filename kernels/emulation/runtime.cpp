// The emulator's runtime: runs a kernel's grid block by block, each block's threads as fibers
// (ucontext) on the calling host thread, with the strict semantics of ../README.md:
//   - between two synchronization points a thread runs alone; the scheduler resumes the ready
//     threads of a block in a seeded random order (`interleave`), so code that needs a barrier it
//     lacks reads what another thread has not written yet;
//   - a warp's lanes meet only at warp collectives (shuffles, votes, __syncwarp), whose masks are
//     checked: every lane named must arrive, none may have exited (`check_sync`);
//   - every __syncthreads must be reached by every thread of the block, at the same call site,
//     and a block that can make no progress is reported as a deadlock, never left hanging;
//   - every __shared__ variable (and the dynamic shared memory) is filled with 0xff bytes, NaN for
//     every float type, when a block starts (`poison_shared`);
//   - test buffers sit against an inaccessible guard page (`check_bounds`), so the first load or
//     store past their end (or before their start) faults; the fault is reported with the kernel,
//     the thread, the block and the element index.
// The first error of a launch stops it and is what cudaGetLastError returns, as on a device; the
// test harness (emulator.py) reads its message with progan_emu_take_error.
#include <cxxabi.h>
#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "progan_emu/cuda.h"

uint3 threadIdx{0, 0, 0};
uint3 blockIdx{0, 0, 0};
dim3 blockDim{1, 1, 1};
dim3 gridDim{1, 1, 1};

namespace progan_emu {
namespace {

struct Options {
  uint64_t seed = 1;
  bool interleave = true;
  bool poison_shared = true;
  bool check_bounds = true;
  bool check_sync = true;
  int64_t max_grid_blocks = 65535 * 8;
};
Options g_options;

// ----- errors -------------------------------------------------------------------------------------
cudaError_t g_error = cudaSuccess;  // the pending error: set once, kept until taken
std::string g_error_message;

void set_error(cudaError_t code, const std::string& message) {
  if (g_error != cudaSuccess) return;
  g_error = code;
  g_error_message = message;
}

std::string format(const char* fmt, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  return buf;
}

std::string site_text(Site s) {
  const char* base = s.file ? std::strrchr(s.file, '/') : nullptr;
  return format("%s:%d", base ? base + 1 : (s.file ? s.file : "?"), s.line);
}

// "0-31, 64, 70-71": thread or lane lists in reports.
std::string ranges(const std::vector<int>& items) {
  std::string out;
  for (size_t i = 0; i < items.size();) {
    size_t j = i;
    while (j + 1 < items.size() && items[j + 1] == items[j] + 1) ++j;
    if (!out.empty()) out += ", ";
    out += j == i ? format("%d", items[i]) : format("%d-%d", items[i], items[j]);
    i = j + 1;
  }
  return out;
}

// ----- the library's own symbols: __shared__ variables, kernel names -------------------------
struct Symbol {
  uintptr_t address;
  size_t size;
  std::string name;  // demangled
};
std::vector<Symbol> g_shared_vars;       // every function-local static: __shared__ is `static` here
std::map<uintptr_t, std::string> g_functions;  // address -> demangled name, for kernel names
bool g_symbols_loaded = false;

std::string demangle(const char* mangled) {
  int status = 0;
  char* d = abi::__cxa_demangle(mangled, nullptr, nullptr, &status);
  std::string out = status == 0 && d ? d : mangled;
  std::free(d);
  return out;
}

// Reads this shared library's .symtab (local symbols are not in the dynamic table). A
// function-local static object (mangled "_ZZ...") of the kernels is a __shared__ variable: the
// kernel sources have no other statics, and the runtime keeps none in functions.
void load_symbols() {
  if (g_symbols_loaded) return;
  g_symbols_loaded = true;
  Dl_info info{};
  if (!dladdr(reinterpret_cast<void*>(&load_symbols), &info) || !info.dli_fname) return;
  const int fd = open(info.dli_fname, O_RDONLY);
  if (fd < 0) return;
  struct stat st {};
  fstat(fd, &st);
  void* map = mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
  close(fd);
  if (map == MAP_FAILED) return;
  const auto* bytes = static_cast<const char*>(map);
  const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(bytes);
  const auto* sh = reinterpret_cast<const Elf64_Shdr*>(bytes + eh->e_shoff);
  const auto base = reinterpret_cast<uintptr_t>(info.dli_fbase);
  for (int i = 0; i < eh->e_shnum; ++i) {
    if (sh[i].sh_type != SHT_SYMTAB) continue;
    const auto* syms = reinterpret_cast<const Elf64_Sym*>(bytes + sh[i].sh_offset);
    const char* names = bytes + sh[sh[i].sh_link].sh_offset;
    for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
      const Elf64_Sym& s = syms[k];
      if (s.st_shndx == SHN_UNDEF || s.st_value == 0) continue;
      const char* name = names + s.st_name;
      const int type = ELF64_ST_TYPE(s.st_info);
      if (type == STT_FUNC) {
        g_functions[base + s.st_value] = demangle(name);
      } else if (type == STT_OBJECT && s.st_size > 0 && std::strncmp(name, "_ZZ", 3) == 0 &&
                 std::strncmp(name, "_ZZNSt", 6) != 0 && std::strncmp(name, "_ZZSt", 5) != 0 &&
                 std::strncmp(name, "_ZZN9__gnu_cxx", 14) != 0) {
        g_shared_vars.push_back({base + s.st_value, s.st_size, demangle(name)});
      }
    }
  }
  munmap(map, st.st_size);
}

// ----- guarded buffers ---------------------------------------------------------------------------
struct Buffer {
  char* region;
  size_t region_size;
  char* base;  // the data
  size_t nbytes, elem_size;
  char* guard;  // the guard page
  std::string name;
};
std::vector<Buffer> g_buffers;
const size_t kPage = static_cast<size_t>(sysconf(_SC_PAGESIZE));

// placement 0: the data ends exactly at a guard page (catches overruns to the element);
// placement 1: the data starts exactly after one (underruns).
void* alloc_buffer(size_t nbytes, size_t elem_size, const char* name, int placement) {
  const size_t data_pages = (nbytes + kPage - 1) / kPage + (nbytes == 0 ? 1 : 0);
  const size_t size = (data_pages + 1) * kPage;
  void* r = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (r == MAP_FAILED) return nullptr;
  Buffer b{static_cast<char*>(r), size, nullptr, nbytes, elem_size ? elem_size : 1, nullptr, name ? name : "?"};
  if (placement == 0) {
    b.guard = b.region + data_pages * kPage;
    b.base = b.guard - nbytes;
  } else {
    b.guard = b.region;
    b.base = b.region + kPage;
  }
  if (g_options.check_bounds) mprotect(b.guard, kPage, PROT_NONE);
  g_buffers.push_back(b);
  return b.base;
}

void free_buffer(void* p) {
  for (size_t i = 0; i < g_buffers.size(); ++i) {
    if (g_buffers[i].base == p) {
      munmap(g_buffers[i].region, g_buffers[i].region_size);
      g_buffers.erase(g_buffers.begin() + static_cast<long>(i));
      return;
    }
  }
}

// ----- fibers -------------------------------------------------------------------------------------
enum class State : uint8_t { Ready, Barrier, Collective, Exited };

struct Fiber {
  ucontext_t context;
  State state;
  uint3 tid;
  int linear;
  Site site;  // where it waits (barrier or collective)
  Collective op;
  unsigned mask;
  uint64_t value;
  int param, width;
  uint64_t result;
};

constexpr size_t kStackSize = 128 * 1024;
std::vector<char*> g_stacks;  // one per thread slot, each with a guard page below it
std::vector<Fiber> g_fibers;
Fiber* g_current = nullptr;
bool g_collective_arrivals = false;  // a fiber reached a warp collective since the last check
ucontext_t g_scheduler;
void (*g_body)(void*) = nullptr;
void* g_body_ctx = nullptr;

struct LaunchInfo {
  std::string kernel;
  Site site;
  dim3 grid, block;
  char* dynamic_smem = nullptr;
  size_t dynamic_smem_size = 0;
} g_launch;
std::set<std::string> g_launched;
uint64_t g_launch_count = 0;

// Fault handling: a SIGSEGV/SIGBUS (guard page) or SIGILL (array bounds trap) inside a kernel
// jumps back to the scheduler with a report.
sigjmp_buf g_fault_jump;
bool g_in_kernel = false;
struct sigaction g_old_segv, g_old_bus, g_old_ill;
char g_fault_message[1024];
char* g_alt_stack = nullptr;

std::string thread_text(const Fiber* f) {
  return format("thread (%u,%u,%u) of block (%u,%u,%u)", f->tid.x, f->tid.y, f->tid.z, blockIdx.x, blockIdx.y,
                blockIdx.z);
}

std::string kernel_text() { return g_launch.kernel + " (launched at " + site_text(g_launch.site) + ")"; }

void on_fault(int sig, siginfo_t* info, void* ucontext) {
  if (!g_in_kernel || !g_current) {  // not ours: let the previous handler see the re-raised fault
    sigaction(SIGSEGV, &g_old_segv, nullptr);
    sigaction(SIGBUS, &g_old_bus, nullptr);
    sigaction(SIGILL, &g_old_ill, nullptr);
    return;
  }
  const char* addr = static_cast<const char*>(info->si_addr);
  const char* access = "access";
#if defined(__x86_64__)
  access = (static_cast<ucontext_t*>(ucontext)->uc_mcontext.gregs[REG_ERR] & 2) ? "write" : "read";
#else
  (void)ucontext;
#endif
  const Fiber* f = g_current;
  if (sig == SIGILL) {  // a -fsanitize=bounds-strict trap: an index past a fixed-size array
    snprintf(g_fault_message, sizeof g_fault_message,
             "out-of-bounds index into a fixed-size array (a local, member or __shared__ array) in %s: %s",
             kernel_text().c_str(), thread_text(f).c_str());
    siglongjmp(g_fault_jump, 1);
  }
  const Buffer* hit = nullptr;
  for (const Buffer& b : g_buffers)
    if (addr >= b.region && addr < b.region + b.region_size) hit = &b;
  if (hit) {
    const long long index = static_cast<long long>(std::floor(double(addr - hit->base) / double(hit->elem_size)));
    snprintf(g_fault_message, sizeof g_fault_message,
             "out-of-bounds %s in %s: %s: element %lld of '%s' (%zu elements of %zu bytes)", access,
             kernel_text().c_str(), thread_text(f).c_str(), index, hit->name.c_str(), hit->nbytes / hit->elem_size,
             hit->elem_size);
  } else {
    snprintf(g_fault_message, sizeof g_fault_message, "invalid %s of address %p (%s) in %s: %s", access,
             static_cast<const void*>(addr), sig == SIGBUS ? "bus error" : "in no emulated buffer",
             kernel_text().c_str(), thread_text(f).c_str());
  }
  siglongjmp(g_fault_jump, 1);
}

void install_fault_handler() {
  // The handler runs on an alternate stack (a fiber's own may be the one that overflowed): the
  // one already set (Python's faulthandler sets one), or ours.
  stack_t current{};
  sigaltstack(nullptr, &current);
  if (!g_alt_stack && (current.ss_flags & SS_DISABLE)) {
    g_alt_stack = static_cast<char*>(std::malloc(1 << 16));
    stack_t ss{};
    ss.ss_sp = g_alt_stack;
    ss.ss_size = 1 << 16;
    sigaltstack(&ss, nullptr);
  }
  struct sigaction sa {};
  sa.sa_sigaction = on_fault;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
  sigemptyset(&sa.sa_mask);
  sigaction(SIGSEGV, &sa, &g_old_segv);
  sigaction(SIGBUS, &sa, &g_old_bus);
  sigaction(SIGILL, &sa, &g_old_ill);
}

void remove_fault_handler() {
  sigaction(SIGSEGV, &g_old_segv, nullptr);
  sigaction(SIGBUS, &g_old_bus, nullptr);
  sigaction(SIGILL, &g_old_ill, nullptr);
}

void trampoline() {
  g_body(g_body_ctx);
  g_current->state = State::Exited;
  g_collective_arrivals = true;  // a collective that names this lane can now be reported
  // returning resumes uc_link: the scheduler
}

void yield_to_scheduler() { swapcontext(&g_current->context, &g_scheduler); }

// Called on a fiber: records the error and never returns (the launch is abandoned).
[[noreturn]] void fail_on_fiber(cudaError_t code, const std::string& message) {
  set_error(code, message);
  g_current->state = State::Exited;
  yield_to_scheduler();
  std::abort();  // a failed fiber is never resumed
}

Fiber* current_fiber(const char* what) {
  if (!g_current) {
    std::fprintf(stderr, "progan_emu: %s called outside a kernel\n", what);
    std::abort();
  }
  return g_current;
}

bool lane_exists(int warp, int lane) { return warp * 32 + lane < static_cast<int>(g_fibers.size()); }

// Completes every warp collective whose lanes have all arrived; false when none could.
bool complete_collectives() {
  bool progressed = false;
  const int n = static_cast<int>(g_fibers.size());
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    if (f.state != State::Collective) continue;
    const int warp = i / 32;
    const unsigned mask = f.mask;
    bool arrived = true;
    for (int k = 0; k < 32; ++k) {
      if (!(mask >> k & 1u)) continue;
      const char* problem = nullptr;
      if (!lane_exists(warp, k)) {
        problem = "does not exist in this block";
      } else {
        const Fiber& o = g_fibers[warp * 32 + k];
        if (o.state == State::Exited) {
          problem = "has exited";
        } else if (o.state != State::Collective || o.mask != mask || o.op != f.op || o.site.line != f.site.line ||
                   o.site.file != f.site.file) {
          // Not there yet (it may be at another collective first, e.g. one with a partial mask). If
          // it never comes, the block stalls and report_deadlock says who waits where.
          arrived = false;
        }
      }
      if (problem && g_options.check_sync) {
        set_error(cudaErrorLaunchFailure,
                  format("warp collective at %s in %s: thread %d (warp %d lane %d, block (%u,%u,%u)) names lane %d "
                         "in its mask 0x%08x, and lane %d %s",
                         site_text(f.site).c_str(), kernel_text().c_str(), i, warp, i % 32, blockIdx.x, blockIdx.y,
                         blockIdx.z, k, mask, k, problem));
        return false;
      }
    }
    if (!arrived) continue;
    // Every lane named has arrived: compute each one's result from the values deposited.
    std::vector<int> lanes;  // (without check_sync, lanes that exited or do not exist are left out)
    for (int k = 0; k < 32; ++k)
      if ((mask >> k & 1u) && lane_exists(warp, k) && g_fibers[warp * 32 + k].state == State::Collective)
        lanes.push_back(k);
    uint64_t vote = 0;
    bool any = false, all = true;
    for (int k : lanes) {
      const bool p = g_fibers[warp * 32 + k].value != 0;
      vote |= uint64_t(p) << k;
      any |= p;
      all &= p;
    }
    for (int k : lanes) {
      Fiber& o = g_fibers[warp * 32 + k];
      const int width = o.width, seg = (k / width) * width;
      int src = k;
      switch (o.op) {
        case Collective::ShflIdx: src = seg + (o.param & (width - 1)); break;
        case Collective::ShflUp: src = k - o.param >= seg ? k - o.param : k; break;
        case Collective::ShflDown: src = k + o.param < seg + width ? k + o.param : k; break;
        case Collective::ShflXor: src = (k ^ o.param) < seg + width ? (k ^ o.param) : k; break;
        default: break;
      }
      switch (o.op) {
        case Collective::Ballot: o.result = vote; break;
        case Collective::Any: o.result = any; break;
        case Collective::All: o.result = all; break;
        case Collective::SyncWarp: o.result = 0; break;
        default:
          if (!(mask >> src & 1u) || !lane_exists(warp, src)) {
            if (g_options.check_sync) {
              set_error(cudaErrorLaunchFailure,
                        format("shuffle at %s in %s: lane %d of warp %d reads lane %d, which is not in the mask "
                               "0x%08x (the value is undefined on a device)",
                               site_text(o.site).c_str(), kernel_text().c_str(), k, warp, src, mask));
              return false;
            }
            src = k;
          }
          o.result = g_fibers[warp * 32 + src].value;
      }
    }
    for (int k : lanes) g_fibers[warp * 32 + k].state = State::Ready;
    progressed = true;
  }
  return progressed;
}

// All live threads wait at a barrier: release them, or report why the barrier is wrong.
bool release_barrier() {
  std::vector<int> exited, waiting;
  std::map<std::string, std::vector<int>> by_site;
  for (const Fiber& f : g_fibers) {
    if (f.state == State::Exited) {
      exited.push_back(f.linear);
    } else if (f.state == State::Barrier) {
      waiting.push_back(f.linear);
      by_site[site_text(f.site)].push_back(f.linear);
    } else {
      return false;
    }
  }
  if (waiting.empty()) return false;
  if (g_options.check_sync) {
    if (!exited.empty()) {
      set_error(cudaErrorLaunchFailure,
                format("__syncthreads at %s in %s, block (%u,%u,%u): reached by %zu of %zu threads; threads %s exited "
                       "without reaching it",
                       by_site.begin()->first.c_str(), kernel_text().c_str(), blockIdx.x, blockIdx.y, blockIdx.z,
                       waiting.size(), g_fibers.size(), ranges(exited).c_str()));
      return false;
    }
    if (by_site.size() > 1) {
      std::string sites;
      for (const auto& [s, t] : by_site) sites += format("%s%s (threads %s)", sites.empty() ? "" : ", ", s.c_str(),
                                                         ranges(t).c_str());
      set_error(cudaErrorLaunchFailure, format("threads of block (%u,%u,%u) in %s wait at different __syncthreads: %s",
                                               blockIdx.x, blockIdx.y, blockIdx.z, kernel_text().c_str(),
                                               sites.c_str()));
      return false;
    }
  }
  for (Fiber& f : g_fibers)
    if (f.state == State::Barrier) f.state = State::Ready;
  return true;
}

void report_deadlock() {
  std::map<std::string, std::vector<int>> groups;
  for (const Fiber& f : g_fibers) {
    if (f.state == State::Barrier) groups["__syncthreads at " + site_text(f.site)].push_back(f.linear);
    if (f.state == State::Collective)
      groups[format("a warp collective at %s (mask 0x%08x)", site_text(f.site).c_str(), f.mask)].push_back(f.linear);
    if (f.state == State::Exited) groups["exited"].push_back(f.linear);
  }
  std::string text;
  for (const auto& [what, t] : groups) text += format("%sthreads %s: %s", text.empty() ? "" : "; ", ranges(t).c_str(),
                                                      what.c_str());
  set_error(cudaErrorLaunchFailure, format("deadlock in %s, block (%u,%u,%u): no thread can proceed: %s",
                                           kernel_text().c_str(), blockIdx.x, blockIdx.y, blockIdx.z, text.c_str()));
}

void poison_shared_memory() {
  if (!g_options.poison_shared) return;
  for (const Symbol& s : g_shared_vars) std::memset(reinterpret_cast<void*>(s.address), 0xff, s.size);
  if (g_launch.dynamic_smem) std::memset(g_launch.dynamic_smem, 0xff, g_launch.dynamic_smem_size);
}

void ensure_stacks(size_t n) {
  while (g_stacks.size() < n) {
    void* r = mmap(nullptr, kStackSize + kPage, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (r == MAP_FAILED) {
      std::fprintf(stderr, "progan_emu: out of memory for fiber stacks\n");
      std::abort();
    }
    mprotect(r, kPage, PROT_NONE);  // a stack overflow faults instead of corrupting a neighbour
    g_stacks.push_back(static_cast<char*>(r) + kPage);
  }
}

// Runs one block to completion; false when an error stopped it.
bool run_block(std::mt19937_64& rng) {
  const int n = static_cast<int>(blockDim.x * blockDim.y * blockDim.z);
  poison_shared_memory();
  ensure_stacks(n);
  g_fibers.assign(n, Fiber{});
  for (int i = 0; i < n; ++i) {
    Fiber& f = g_fibers[i];
    f.state = State::Ready;
    f.linear = i;
    f.tid = uint3{unsigned(i) % blockDim.x, unsigned(i) / blockDim.x % blockDim.y, unsigned(i) / (blockDim.x * blockDim.y)};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = g_stacks[i];
    f.context.uc_stack.ss_size = kStackSize;
    f.context.uc_link = &g_scheduler;
    makecontext(&f.context, trampoline, 0);
  }
  std::vector<int> ready;
  if (sigsetjmp(g_fault_jump, 1)) {  // a fiber faulted (on_fault): the block is abandoned
    g_current = nullptr;
    set_error(cudaErrorIllegalAddress, g_fault_message);
    return false;
  }
  // Two ways to order a block's threads, one drawn per block (with `interleave`):
  //  - random subsets: each round, every ready thread runs with probability 1/2, in a random order;
  //  - warp priorities (as in PCT, probabilistic concurrency testing): only the ready threads of the
  //    highest-priority warp run, and the priorities are redrawn now and then. A low-priority warp
  //    waits while the others run as far as they can: a reader that a missing barrier no longer
  //    holds back is overtaken by the writers of the next round, as when a warp stalls on a device.
  const bool by_priority = g_options.interleave && (rng() & 1);
  const int warps = (n + 31) / 32;
  std::vector<int> priority(warps);  // warp -> rank (0 runs first)
  auto draw_priorities = [&] {
    for (int w = 0; w < warps; ++w) priority[w] = w;
    std::shuffle(priority.begin(), priority.end(), rng);
  };
  draw_priorities();
  for (;;) {
    if (g_collective_arrivals) {
      g_collective_arrivals = false;
      complete_collectives();
      if (g_error != cudaSuccess) return false;
    }
    ready.clear();
    for (int i = 0; i < n; ++i)
      if (g_fibers[i].state == State::Ready) ready.push_back(i);
    if (ready.empty()) {
      if (std::all_of(g_fibers.begin(), g_fibers.end(), [](const Fiber& f) { return f.state == State::Exited; }))
        return true;
      if (release_barrier()) continue;
      if (g_error != cudaSuccess) return false;
      report_deadlock();
      return false;
    }
    if (by_priority) {
      if (rng() % 32 == 0) draw_priorities();
      int best = warps;
      for (int i : ready) best = std::min(best, priority[i / 32]);
      ready.erase(std::remove_if(ready.begin(), ready.end(), [&](int i) { return priority[i / 32] != best; }),
                  ready.end());
      std::shuffle(ready.begin(), ready.end(), rng);
    } else if (g_options.interleave) {
      std::shuffle(ready.begin(), ready.end(), rng);
      const size_t keep = std::max<size_t>(1, std::count_if(ready.begin(), ready.end(), [&](int) {
                                             return rng() & 1;
                                           }));
      ready.resize(keep);
    }
    for (int i : ready) {
      g_current = &g_fibers[i];
      threadIdx = g_current->tid;
      swapcontext(&g_scheduler, &g_current->context);
      g_current = nullptr;
      if (g_error != cudaSuccess) return false;
    }
  }
}

// "pixel_norm_fwd_kernel<float>": the instantiation's name from the symbol table (the source text,
// e.g. "pixel_norm_fwd_kernel<scalar_t>", when it is not there).
std::string kernel_name(const char* source_name, const void* kernel) {
  const auto it = g_functions.find(reinterpret_cast<uintptr_t>(kernel));
  if (it == g_functions.end()) return source_name;
  std::string s = it->second;
  if (s.rfind("void ", 0) == 0) s = s.substr(5);
  int depth = 0;  // cut the parameter list: the first '(' outside template arguments
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '<') ++depth;
    if (s[i] == '>') --depth;
    if (s[i] == '(' && depth == 0 && s.compare(i, 21, "(anonymous namespace)") != 0) {
      s = s.substr(0, i);
      break;
    }
  }
  for (const char* prefix : {"progan::cuda::", "(anonymous namespace)::"}) {
    for (size_t at; (at = s.find(prefix)) != std::string::npos;) s.erase(at, std::strlen(prefix));
  }
  return s;
}

bool valid_config(dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  return threads >= 1 && threads <= 1024 && block.x <= 1024 && block.y <= 1024 && block.z <= 64 && grid.x >= 1 &&
         grid.x <= 0x7fffffffu && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 && grid.z <= 65535 &&
         smem <= 48 * 1024;
}

}  // namespace

void syncthreads(Site site) {
  Fiber* f = current_fiber("__syncthreads");
  f->state = State::Barrier;
  f->site = site;
  yield_to_scheduler();
}

uint64_t warp_collective(Collective op, unsigned mask, uint64_t value, int param, int width, Site site) {
  Fiber* f = current_fiber("a warp collective");
  const int lane = f->linear % 32;
  if (g_options.check_sync) {
    if (!(mask >> lane & 1u))
      fail_on_fiber(cudaErrorLaunchFailure,
                    format("warp collective at %s in %s: %s (lane %d) calls it with mask 0x%08x, which does not name "
                           "its own lane",
                           site_text(site).c_str(), kernel_text().c_str(), thread_text(f).c_str(), lane, mask));
    if (width < 1 || width > 32 || (width & (width - 1)))
      fail_on_fiber(cudaErrorLaunchFailure, format("shuffle at %s in %s: width %d is not a power of two up to 32",
                                                   site_text(site).c_str(), kernel_text().c_str(), width));
  }
  f->state = State::Collective;
  g_collective_arrivals = true;
  f->op = op;
  f->mask = mask;
  f->value = value;
  f->param = param;
  f->width = width;
  f->site = site;
  yield_to_scheduler();
  return f->result;
}

unsigned active_mask() {
  Fiber* f = current_fiber("__activemask");
  const int warp = f->linear / 32;
  unsigned m = 0;
  for (int k = 0; k < 32; ++k)
    if (lane_exists(warp, k) && g_fibers[warp * 32 + k].state != State::Exited) m |= 1u << k;
  return m;
}

void* dynamic_shared() { return g_launch.dynamic_smem; }

int64_t max_grid_blocks() { return g_options.max_grid_blocks; }

void launch_kernel(const char* name, const void* kernel, Site site, dim3 grid, dim3 block, size_t dynamic_smem,
                   cudaStream_t stream, void (*body)(void*), void* ctx) {
  (void)stream;  // one host thread runs everything in launch order: every stream is the same
  load_symbols();
  if (g_error != cudaSuccess) return;  // like a device after a fault, nothing runs until the error is taken
  g_launch.kernel = kernel_name(name, kernel);
  g_launch.site = site;
  g_launch.grid = grid;
  g_launch.block = block;
  if (!valid_config(grid, block, dynamic_smem)) {
    set_error(cudaErrorInvalidConfiguration,
              format("invalid launch configuration of %s: grid (%u,%u,%u), block (%u,%u,%u), %zu bytes of dynamic "
                     "shared memory",
                     kernel_text().c_str(), grid.x, grid.y, grid.z, block.x, block.y, block.z, dynamic_smem));
    return;
  }
  const uint64_t blocks = uint64_t(grid.x) * grid.y * grid.z;
  if (blocks * block.x * block.y * block.z > (uint64_t(1) << 24)) {
    set_error(cudaErrorInvalidValue, format("%s: grid of %llu blocks is too large to emulate (lower max_grid_blocks)",
                                            kernel_text().c_str(), static_cast<unsigned long long>(blocks)));
    return;
  }
  g_launched.insert(g_launch.kernel);
  if (dynamic_smem) {
    g_launch.dynamic_smem = static_cast<char*>(alloc_buffer(dynamic_smem, 1, "dynamic shared memory", 0));
    g_launch.dynamic_smem_size = dynamic_smem;
  }
  g_body = body;
  g_body_ctx = ctx;
  gridDim = grid;
  blockDim = block;
  std::mt19937_64 rng(g_options.seed * 0x9e3779b97f4a7c15ull + g_launch_count++);
  std::vector<uint64_t> order(blocks);
  for (uint64_t b = 0; b < blocks; ++b) order[b] = b;
  if (g_options.interleave) std::shuffle(order.begin(), order.end(), rng);  // blocks have no order either
  install_fault_handler();
  g_in_kernel = true;
  for (uint64_t b : order) {
    blockIdx = uint3{unsigned(b % grid.x), unsigned(b / grid.x % grid.y), unsigned(b / (uint64_t(grid.x) * grid.y))};
    if (!run_block(rng)) break;
  }
  g_in_kernel = false;
  remove_fault_handler();
  if (g_launch.dynamic_smem) free_buffer(g_launch.dynamic_smem);
  g_launch.dynamic_smem = nullptr;
  g_fibers.clear();
}

}  // namespace progan_emu

cudaError_t cudaGetLastError() {
  const cudaError_t e = progan_emu::g_error;
  progan_emu::g_error = cudaSuccess;  // the message stays for progan_emu_take_error
  return e;
}
cudaError_t cudaPeekAtLastError() { return progan_emu::g_error; }
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalAddress: return "an illegal memory access was encountered";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
  }
  return "unknown error";
}

// ----- the C interface of the test harness (kernels/emulation/emulator.py) ---------------------
// (No function-local statics in the runtime: the runtime would take them for __shared__ variables.)
namespace {
std::string g_returned_text;  // what the last of the functions below returned
}

extern "C" {
void progan_emu_configure(uint64_t seed, int interleave, int poison_shared, int check_bounds, int check_sync,
                          int64_t max_grid_blocks) {
  using progan_emu::g_options;
  g_options.seed = seed;
  g_options.interleave = interleave != 0;
  g_options.poison_shared = poison_shared != 0;
  g_options.check_bounds = check_bounds != 0;
  g_options.check_sync = check_sync != 0;
  g_options.max_grid_blocks = max_grid_blocks;
  // Schedules are drawn from (seed, launches since this call): what a test sees after configuring
  // does not depend on how many launches earlier tests made in the same process.
  progan_emu::g_launch_count = 0;
}

void* progan_emu_alloc(size_t nbytes, size_t elem_size, const char* name, int placement) {
  return progan_emu::alloc_buffer(nbytes, elem_size, name, placement);
}
void progan_emu_free(void* p) { progan_emu::free_buffer(p); }

// The message of the last error (empty when none) and clears it; the launcher already returned the code.
const char* progan_emu_take_error() {
  g_returned_text = progan_emu::g_error_message;
  progan_emu::g_error_message.clear();
  progan_emu::g_error = cudaSuccess;
  return g_returned_text.c_str();
}

// Newline-separated kernel names (with template arguments) launched since the library loaded.
const char* progan_emu_launched_kernels() {
  g_returned_text.clear();
  for (const std::string& k : progan_emu::g_launched) g_returned_text += k + "\n";
  return g_returned_text.c_str();
}

// Newline-separated "bytes name" of every __shared__ variable the runtime poisons.
const char* progan_emu_shared_variables() {
  progan_emu::load_symbols();
  g_returned_text.clear();
  for (const auto& s : progan_emu::g_shared_vars) g_returned_text += std::to_string(s.size) + " " + s.name + "\n";
  return g_returned_text.c_str();
}

// CUDA's conversions, for testing them against torch's.
void progan_emu_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2half_rn(in[i]).__x;
}
void progan_emu_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(in[i]));
}
void progan_emu_float_to_bfloat16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __float2bfloat16_rn(in[i]).__x;
}
void progan_emu_bfloat16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__ushort_as_bfloat16(in[i]));
}
}
