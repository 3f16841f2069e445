/*
 * run_code: executes raw position-independent machine-code blobs (the CODE section of an
 * .edgec artifact) through the artifact's entry ABI, so that tests can run code generated for
 * aarch64 or riscv64 under qemu-user, many test cases per emulator process. It compiles with
 * any C99 compiler on Linux (cross or native: on the host it runs x86_64 code directly).
 *
 *   run_code JOBFILE
 *
 * JOBFILE is line-based text. Blank lines and lines starting with '#' are ignored. A keyword
 * and its arguments are separated by single spaces; PATH and NAME run to the end of the line,
 * so they may contain spaces (not newlines). Each job is:
 *
 *   job NAME                 starts a job (NAME is echoed in the result line)
 *   code PATH                raw machine code, required, non-empty
 *   entry OFFSET             byte offset of the entry function in the code (default 0)
 *   weights PATH             the WEIGHTS bytes (optional; the file may be empty)
 *   arena BYTES              scratch arena size (default 0; at least 64 bytes are allocated)
 *   symbols N V1 .. VN       int64 symbol values (default none)
 *   parallel CHUNK           pass a parallel_for callback that runs the tasks serially, CHUNK
 *                            units at a time, in reverse order (default: parallel_for is NULL)
 *   input PATH               raw little-endian tensor bytes; repeat, in META order
 *   output BYTES PATH        output size and the file to write it to; repeat, in META order
 *   end                      runs the job
 *
 * For each job, the code is copied into a fresh RW mapping that is then made R+X (never W+X),
 * weights, inputs, arena and outputs are separate 64-byte aligned blocks (arena zeroed, outputs
 * pre-filled with 0xCD), and the entry is called as
 *
 *   typedef struct { const void *const *inputs; void *const *outputs; const uint8_t *weights;
 *                    uint8_t *arena; const int64_t *symbols; void *parallel_for;
 *                    void *parallel_ctx; } EdgecCall;
 *   void entry(const EdgecCall *call);      (parallel_for and parallel_ctx are NULL)
 *
 * Each output and the arena are followed by a 64-byte guard of 0xCD bytes that is checked after
 * the call, to catch writes past the end. Result lines on stdout, flushed after each job:
 *
 *   ok NAME                  the job ran and its outputs were written
 *   fail NAME: REASON        the job ran but wrote outside a buffer; later jobs still run
 *   crash NAME: SIGNAL       the code raised SIGSEGV/SIGBUS/SIGILL/SIGFPE/SIGTRAP; stops (exit 3)
 *   error [NAME: ]REASON     bad job file or I/O error; stops (exit 2)
 *
 * Exit status: 0 when every job printed ok, 1 if some job failed, 2 on errors, 3 on a crash.
 */
#define _XOPEN_SOURCE 700 /* sigaltstack, SA_ONSTACK */
#define _DEFAULT_SOURCE   /* MAP_ANONYMOUS (glibc) */

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

typedef struct {
    const void *const *inputs;
    void *const *outputs;
    const uint8_t *weights;
    uint8_t *arena;
    const int64_t *symbols;
    void *parallel_for;
    void *parallel_ctx;
} EdgecCall;

typedef void (*EntryFn)(const EdgecCall *call);

#define ALIGN 64u
#define GUARD 64u
#define GARBAGE 0xCD
#define MAX_TENSORS 1024
#define MAX_SYMBOLS 1024
/* Any single buffer above this is a bad job file, not a test (mirrors MAX_ARENA_BYTES). */
#define MAX_BYTES ((uint64_t)1 << 40)

typedef struct {
    char *path;
    uint64_t size;
} Output;

typedef struct {
    char *name;
    char *code_path;
    char *weights_path;
    uint64_t entry;
    int have_entry;
    uint64_t arena;
    int have_arena;
    int64_t *symbols;
    size_t n_symbols;
    int have_symbols;
    int64_t parallel_chunk; /* 0: parallel_for is NULL */
    char *inputs[MAX_TENSORS];
    size_t n_inputs;
    Output outputs[MAX_TENSORS];
    size_t n_outputs;
} Job;

/* The ABI's parallel_for, run on this thread: chunks of *ctx units, last chunk first, so a task
 * that ignored its range (or assumed order) would produce wrong results. */
typedef void (*TaskFn)(const void *params, int64_t begin, int64_t end);
static void serial_parallel_for(void *ctx, TaskFn task, const void *params, int64_t n) {
    int64_t chunk = *(const int64_t *)ctx;
    int64_t begin;
    for (begin = ((n - 1) / chunk) * chunk; begin >= 0; begin -= chunk) {
        task(params, begin, begin + chunk < n ? begin + chunk : n);
    }
}

/* ---- diagnostics --------------------------------------------------------------------------- */

static const char *g_jobfile = "";
static unsigned long g_line = 0;

/* The job being run, for the crash handler; written before the call only. */
static volatile sig_atomic_t g_in_call = 0;
static char g_crash_name[512];
static size_t g_crash_name_len = 0;

static void fatal(const Job *job, const char *fmt, ...) __attribute__((format(printf, 2, 3), noreturn));
static void syntax(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));

static void fatal(const Job *job, const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    if (job != NULL && job->name != NULL) {
        printf("error %s: ", job->name);
    } else {
        printf("error ");
    }
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    exit(2);
}

static void syntax(const char *fmt, ...) {
    va_list ap;
    fflush(stdout);
    printf("error %s:%lu: ", g_jobfile, g_line);
    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    printf("\n");
    fflush(stdout);
    exit(2);
}

static void write_all_fd(int fd, const char *s, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, s, n);
        if (w <= 0) {
            if (w < 0 && errno == EINTR) {
                continue;
            }
            return;
        }
        s += w;
        n -= (size_t)w;
    }
}

/* Async-signal-safe: only write() and _exit(). */
static void on_crash(int sig) {
    const char *what = "signal";
    switch (sig) {
    case SIGSEGV: what = "SIGSEGV"; break;
    case SIGBUS: what = "SIGBUS"; break;
    case SIGILL: what = "SIGILL"; break;
    case SIGFPE: what = "SIGFPE"; break;
    case SIGTRAP: what = "SIGTRAP"; break;
    default: break;
    }
    if (g_in_call) {
        write_all_fd(STDOUT_FILENO, "crash ", 6);
        write_all_fd(STDOUT_FILENO, g_crash_name, g_crash_name_len);
        write_all_fd(STDOUT_FILENO, ": ", 2);
    } else {
        write_all_fd(STDOUT_FILENO, "error harness crashed: ", 23);
    }
    write_all_fd(STDOUT_FILENO, what, strlen(what));
    write_all_fd(STDOUT_FILENO, "\n", 1);
    _exit(3);
}

static void install_crash_handlers(void) {
    static const int sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP};
    stack_t ss;
    struct sigaction sa;
    size_t i;
    /* An alternate stack, so a crash with a wild stack pointer is still reported. */
    static uint64_t altstack[8192]; /* 64 KiB */
    ss.ss_sp = altstack;
    ss.ss_size = sizeof altstack;
    ss.ss_flags = 0;
    if (sigaltstack(&ss, NULL) != 0) {
        fatal(NULL, "sigaltstack: %s", strerror(errno));
    }
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_crash;
    sa.sa_flags = (int)(SA_ONSTACK | SA_RESETHAND);
    sigemptyset(&sa.sa_mask);
    for (i = 0; i < sizeof sigs / sizeof sigs[0]; i++) {
        if (sigaction(sigs[i], &sa, NULL) != 0) {
            fatal(NULL, "sigaction: %s", strerror(errno));
        }
    }
}

/* ---- memory and files ---------------------------------------------------------------------- */

static uint64_t round_up(uint64_t v, uint64_t to) {
    return (v + to - 1) / to * to;
}

/* A 64-byte aligned block of max(size, 1) bytes rounded up to 64, plus `extra` bytes. */
static uint8_t *alloc_aligned(const Job *job, uint64_t size, uint64_t extra, const char *what) {
    void *p = NULL;
    uint64_t total;
    int rc;
    if (size > MAX_BYTES) {
        fatal(job, "%s: %llu bytes is too large", what, (unsigned long long)size);
    }
    total = round_up(size == 0 ? 1 : size, ALIGN) + extra;
    if (total > (uint64_t)SIZE_MAX) {
        fatal(job, "%s: %llu bytes do not fit in memory", what, (unsigned long long)total);
    }
    rc = posix_memalign(&p, ALIGN, (size_t)total);
    if (rc != 0 || p == NULL) {
        fatal(job, "%s: cannot allocate %llu bytes: %s", what, (unsigned long long)total, strerror(rc));
    }
    return (uint8_t *)p;
}

/* Opens `path` and returns its size; the caller reads it with read_exact. */
static int open_sized(const Job *job, const char *path, uint64_t *size) {
    struct stat st;
    int fd = open(path, O_RDONLY);
    if (fd < 0) {
        fatal(job, "cannot open %s: %s", path, strerror(errno));
    }
    if (fstat(fd, &st) != 0) {
        fatal(job, "cannot stat %s: %s", path, strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        fatal(job, "%s is not a regular file", path);
    }
    if (st.st_size < 0 || (uint64_t)st.st_size > MAX_BYTES) {
        fatal(job, "%s: size %lld is out of range", path, (long long)st.st_size);
    }
    *size = (uint64_t)st.st_size;
    return fd;
}

static void read_exact(const Job *job, int fd, const char *path, uint8_t *dst, uint64_t size) {
    uint64_t done = 0;
    while (done < size) {
        size_t chunk = (size - done) > (1u << 30) ? (1u << 30) : (size_t)(size - done);
        ssize_t n = read(fd, dst + done, chunk);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            fatal(job, "cannot read %s: %s", path, strerror(errno));
        }
        if (n == 0) {
            fatal(job, "%s: file shrank while reading (%llu of %llu bytes)", path, (unsigned long long)done,
                  (unsigned long long)size);
        }
        done += (uint64_t)n;
    }
    if (close(fd) != 0) {
        fatal(job, "cannot close %s: %s", path, strerror(errno));
    }
}

/* Reads a whole file into a 64-byte aligned block whose tail (up to the 64-byte boundary) is 0. */
static uint8_t *load_aligned(const Job *job, const char *path, uint64_t *size_out, const char *what) {
    uint64_t size;
    int fd = open_sized(job, path, &size);
    uint8_t *buf = alloc_aligned(job, size, 0, what);
    memset(buf, 0, (size_t)round_up(size == 0 ? 1 : size, ALIGN));
    read_exact(job, fd, path, buf, size);
    *size_out = size;
    return buf;
}

static void write_file(const Job *job, const char *path, const uint8_t *src, uint64_t size) {
    uint64_t done = 0;
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        fatal(job, "cannot create %s: %s", path, strerror(errno));
    }
    while (done < size) {
        size_t chunk = (size - done) > (1u << 30) ? (1u << 30) : (size_t)(size - done);
        ssize_t n = write(fd, src + done, chunk);
        if (n < 0) {
            if (errno == EINTR) {
                continue;
            }
            fatal(job, "cannot write %s: %s", path, strerror(errno));
        }
        if (n == 0) {
            fatal(job, "cannot write %s: no progress", path);
        }
        done += (uint64_t)n;
    }
    if (close(fd) != 0) {
        fatal(job, "cannot close %s: %s", path, strerror(errno));
    }
}

/* Copies the code into a fresh mapping and makes it read+execute. */
static uint8_t *map_code(const Job *job, uint64_t *size_out, size_t *map_len_out) {
    uint64_t size;
    long page = sysconf(_SC_PAGESIZE);
    size_t map_len;
    void *map;
    int fd = open_sized(job, job->code_path, &size);
    if (page <= 0) {
        fatal(job, "sysconf(_SC_PAGESIZE) failed");
    }
    if (size == 0) {
        fatal(job, "%s: the code is empty", job->code_path);
    }
    if (job->entry >= size) {
        fatal(job, "entry %llu is not inside the %llu-byte code", (unsigned long long)job->entry,
              (unsigned long long)size);
    }
    map_len = (size_t)round_up(size, (uint64_t)page);
    map = mmap(NULL, map_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
        fatal(job, "mmap of %llu code bytes: %s", (unsigned long long)map_len, strerror(errno));
    }
    read_exact(job, fd, job->code_path, (uint8_t *)map, size);
    if (mprotect(map, map_len, PROT_READ | PROT_EXEC) != 0) {
        fatal(job, "mprotect(PROT_READ|PROT_EXEC): %s", strerror(errno));
    }
    /* Makes the instruction cache see the new code (a no-op on x86_64). */
    __builtin___clear_cache((char *)map, (char *)map + size);
    *size_out = size;
    *map_len_out = map_len;
    return (uint8_t *)map;
}

static const uint8_t *find_not_garbage(const uint8_t *p, size_t n) {
    size_t i;
    for (i = 0; i < n; i++) {
        if (p[i] != GARBAGE) {
            return p + i;
        }
    }
    return NULL;
}

/* ---- running a job ------------------------------------------------------------------------- */

/* Returns 1 if the job ran cleanly, 0 if it wrote past a buffer (reported as `fail`). */
static int run_job(const Job *job) {
    uint64_t code_size = 0, weights_size = 0;
    size_t code_map_len = 0, i;
    uint8_t *code, *weights, *arena;
    uint64_t arena_alloc;
    const void **in_ptrs;
    void **out_ptrs;
    int64_t *symbols;
    EdgecCall call;
    EntryFn entry;
    int clean = 1;
    char reason[256];

    reason[0] = '\0';
    code = map_code(job, &code_size, &code_map_len);
    if (job->weights_path != NULL) {
        weights = load_aligned(job, job->weights_path, &weights_size, "weights");
    } else {
        weights = alloc_aligned(job, 0, 0, "weights");
        memset(weights, 0, ALIGN);
    }

    /* At least 64 bytes, zeroed, then a guard. */
    arena_alloc = round_up(job->arena == 0 ? ALIGN : job->arena, ALIGN);
    arena = alloc_aligned(job, arena_alloc, GUARD, "arena");
    memset(arena, 0, (size_t)arena_alloc);
    memset(arena + arena_alloc, GARBAGE, GUARD);

    in_ptrs = (const void **)calloc(job->n_inputs + 1, sizeof *in_ptrs);
    out_ptrs = (void **)calloc(job->n_outputs + 1, sizeof *out_ptrs);
    symbols = (int64_t *)calloc(job->n_symbols + 1, sizeof *symbols);
    if (in_ptrs == NULL || out_ptrs == NULL || symbols == NULL) {
        fatal(job, "out of memory");
    }
    for (i = 0; i < job->n_inputs; i++) {
        uint64_t size;
        in_ptrs[i] = load_aligned(job, job->inputs[i], &size, "input");
    }
    for (i = 0; i < job->n_outputs; i++) {
        uint64_t size = job->outputs[i].size;
        uint64_t span = round_up(size == 0 ? 1 : size, ALIGN) + GUARD;
        out_ptrs[i] = alloc_aligned(job, size, GUARD, "output");
        memset(out_ptrs[i], GARBAGE, (size_t)span);
    }
    for (i = 0; i < job->n_symbols; i++) {
        symbols[i] = job->symbols[i];
    }

    call.inputs = in_ptrs;
    call.outputs = out_ptrs;
    call.weights = weights;
    call.arena = arena;
    call.symbols = symbols;
    call.parallel_for = job->parallel_chunk > 0 ? (void *)(uintptr_t)serial_parallel_for : NULL;
    call.parallel_ctx = job->parallel_chunk > 0 ? (void *)&job->parallel_chunk : NULL;

    /* Integer to function pointer: implementation-defined, exact on every POSIX target. */
    entry = (EntryFn)(uintptr_t)(code + job->entry);
    g_in_call = 1;
    entry(&call);
    g_in_call = 0;

    /* Guards: anything but 0xCD after a buffer's end was written by the code. */
    for (i = 0; i < job->n_outputs && clean; i++) {
        const uint8_t *p = (const uint8_t *)out_ptrs[i];
        uint64_t size = job->outputs[i].size;
        uint64_t span = round_up(size == 0 ? 1 : size, ALIGN) + GUARD;
        const uint8_t *bad = find_not_garbage(p + size, (size_t)(span - size));
        if (bad != NULL) {
            snprintf(reason, sizeof reason, "output %lu (%llu bytes): byte %llu past its end was written",
                     (unsigned long)i, (unsigned long long)size, (unsigned long long)(bad - (p + size)));
            clean = 0;
        }
    }
    if (clean) {
        const uint8_t *bad = find_not_garbage(arena + arena_alloc, GUARD);
        if (bad != NULL) {
            snprintf(reason, sizeof reason, "arena (%llu bytes): byte %llu past its end was written",
                     (unsigned long long)job->arena, (unsigned long long)(bad - (arena + job->arena)));
            clean = 0;
        }
    }
    if (clean) {
        for (i = 0; i < job->n_outputs; i++) {
            write_file(job, job->outputs[i].path, (const uint8_t *)out_ptrs[i], job->outputs[i].size);
        }
    }

    for (i = 0; i < job->n_inputs; i++) {
        free((void *)in_ptrs[i]);
    }
    for (i = 0; i < job->n_outputs; i++) {
        free(out_ptrs[i]);
    }
    free(in_ptrs);
    free(out_ptrs);
    free(symbols);
    free(arena);
    free(weights);
    if (munmap(code, code_map_len) != 0) {
        fatal(job, "munmap: %s", strerror(errno));
    }

    if (clean) {
        printf("ok %s\n", job->name);
    } else {
        printf("fail %s: %s\n", job->name, reason);
    }
    if (fflush(stdout) != 0) {
        exit(2);
    }
    return clean;
}

/* ---- parsing ------------------------------------------------------------------------------- */

static char *dup_str(const char *s) {
    size_t n = strlen(s) + 1;
    char *d = (char *)malloc(n);
    if (d == NULL) {
        fatal(NULL, "out of memory");
    }
    memcpy(d, s, n);
    return d;
}

/* A non-negative decimal that fits in uint64_t; the whole token must be digits. */
static uint64_t parse_u64(const char *s, const char *what) {
    uint64_t v = 0;
    const char *p = s;
    if (*p == '\0') {
        syntax("%s: missing number", what);
    }
    for (; *p != '\0'; p++) {
        unsigned d;
        if (*p < '0' || *p > '9') {
            syntax("bad number in `%s`", s);
        }
        d = (unsigned)(*p - '0');
        if (v > (UINT64_MAX - d) / 10) {
            syntax("number `%s` is too large", s);
        }
        v = v * 10 + d;
    }
    return v;
}

static int64_t parse_i64(const char *s) {
    int neg = (*s == '-');
    uint64_t mag = parse_u64(neg ? s + 1 : s, "symbol");
    if (neg) {
        if (mag > (uint64_t)INT64_MAX + 1) {
            syntax("symbol `%s` is out of range", s);
        }
        return mag == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)mag;
    }
    if (mag > (uint64_t)INT64_MAX) {
        syntax("symbol `%s` is out of range", s);
    }
    return (int64_t)mag;
}

/* Splits "KEYWORD REST" at the first space; REST is "" when there is none. */
static char *split_keyword(char *line) {
    char *sp = strchr(line, ' ');
    if (sp == NULL) {
        return line + strlen(line);
    }
    *sp = '\0';
    return sp + 1;
}

static int is_keyword(const char *word) {
    static const char *const words[] = {"code", "entry", "weights", "arena", "symbols", "parallel", "input", "output", "end"};
    size_t i;
    for (i = 0; i < sizeof words / sizeof words[0]; i++) {
        if (strcmp(word, words[i]) == 0) {
            return 1;
        }
    }
    return 0;
}

static void need_arg(const char *arg, const char *keyword) {
    if (*arg == '\0') {
        syntax("`%s` needs an argument", keyword);
    }
}

static void free_job(Job *job) {
    size_t i;
    free(job->name);
    free(job->code_path);
    free(job->weights_path);
    free(job->symbols);
    for (i = 0; i < job->n_inputs; i++) {
        free(job->inputs[i]);
    }
    for (i = 0; i < job->n_outputs; i++) {
        free(job->outputs[i].path);
    }
    memset(job, 0, sizeof *job);
}

static void parse_symbols(Job *job, char *arg) {
    char *save = NULL;
    char *tok = strtok_r(arg, " ", &save);
    uint64_t n;
    size_t i;
    if (tok == NULL) {
        syntax("`symbols` needs a count");
    }
    n = parse_u64(tok, "symbols count");
    if (n > MAX_SYMBOLS) {
        syntax("more than %d symbols", MAX_SYMBOLS);
    }
    job->symbols = (int64_t *)calloc((size_t)n + 1, sizeof *job->symbols);
    if (job->symbols == NULL) {
        fatal(job, "out of memory");
    }
    for (i = 0; i < (size_t)n; i++) {
        tok = strtok_r(NULL, " ", &save);
        if (tok == NULL) {
            syntax("`symbols`: fewer values than the count");
        }
        job->symbols[i] = parse_i64(tok);
    }
    if (strtok_r(NULL, " ", &save) != NULL) {
        syntax("`symbols`: more values than the count");
    }
    job->n_symbols = (size_t)n;
    job->have_symbols = 1;
}

int main(int argc, char **argv) {
    FILE *f;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    Job job;
    int in_job = 0, all_clean = 1;

    if (argc != 2) {
        fprintf(stderr, "usage: %s JOBFILE\n", argc > 0 ? argv[0] : "run_code");
        return 2;
    }
    g_jobfile = argv[1];
    memset(&job, 0, sizeof job);
    install_crash_handlers();
    f = fopen(argv[1], "r");
    if (f == NULL) {
        fatal(NULL, "cannot open job file %s: %s", argv[1], strerror(errno));
    }

    while (errno = 0, (len = getline(&line, &cap, f)) >= 0) {
        char *arg;
        g_line++;
        if (len > 0 && line[len - 1] == '\n') {
            line[--len] = '\0';
        }
        if ((size_t)len != strlen(line)) {
            syntax("NUL byte in line");
        }
        if (len == 0 || line[0] == '#') {
            continue;
        }
        arg = split_keyword(line);
        if (strcmp(line, "job") == 0) {
            if (in_job) {
                syntax("`job` before the previous job's `end`");
            }
            need_arg(arg, "job");
            job.name = dup_str(arg);
            in_job = 1;
            continue;
        }
        if (!is_keyword(line)) {
            syntax("unknown keyword `%s`", line);
        }
        if (!in_job) {
            syntax("`%s` outside a job (expected `job NAME`)", line);
        }
        if (strcmp(line, "code") == 0) {
            need_arg(arg, "code");
            if (job.code_path != NULL) {
                syntax("duplicate `code`");
            }
            job.code_path = dup_str(arg);
        } else if (strcmp(line, "entry") == 0) {
            if (job.have_entry) {
                syntax("duplicate `entry`");
            }
            job.entry = parse_u64(arg, "entry");
            job.have_entry = 1;
        } else if (strcmp(line, "weights") == 0) {
            need_arg(arg, "weights");
            if (job.weights_path != NULL) {
                syntax("duplicate `weights`");
            }
            job.weights_path = dup_str(arg);
        } else if (strcmp(line, "arena") == 0) {
            if (job.have_arena) {
                syntax("duplicate `arena`");
            }
            job.arena = parse_u64(arg, "arena");
            if (job.arena > MAX_BYTES) {
                syntax("arena %s is too large", arg);
            }
            job.have_arena = 1;
        } else if (strcmp(line, "symbols") == 0) {
            if (job.have_symbols) {
                syntax("duplicate `symbols`");
            }
            parse_symbols(&job, arg);
        } else if (strcmp(line, "parallel") == 0) {
            uint64_t chunk = parse_u64(arg, "parallel chunk");
            if (chunk == 0 || chunk > 1000000) {
                syntax("parallel chunk %s must be in 1..1000000", arg);
            }
            job.parallel_chunk = (int64_t)chunk;
        } else if (strcmp(line, "input") == 0) {
            need_arg(arg, "input");
            if (job.n_inputs >= MAX_TENSORS) {
                syntax("more than %d inputs", MAX_TENSORS);
            }
            job.inputs[job.n_inputs++] = dup_str(arg);
        } else if (strcmp(line, "output") == 0) {
            char *path = split_keyword(arg);
            uint64_t size;
            need_arg(path, "output BYTES");
            size = parse_u64(arg, "output size");
            if (size > MAX_BYTES) {
                syntax("output size %s is too large", arg);
            }
            if (job.n_outputs >= MAX_TENSORS) {
                syntax("more than %d outputs", MAX_TENSORS);
            }
            job.outputs[job.n_outputs].size = size;
            job.outputs[job.n_outputs].path = dup_str(path);
            job.n_outputs++;
        } else if (strcmp(line, "end") == 0) {
            if (*arg != '\0') {
                syntax("`end` takes no argument");
            }
            if (job.code_path == NULL) {
                syntax("job without `code`");
            }
            g_crash_name_len = strlen(job.name);
            if (g_crash_name_len >= sizeof g_crash_name) {
                g_crash_name_len = sizeof g_crash_name - 1;
            }
            memcpy(g_crash_name, job.name, g_crash_name_len);
            all_clean &= run_job(&job);
            free_job(&job);
            in_job = 0;
        } else {
            syntax("unknown keyword `%s`", line);
        }
    }
    if (errno != 0 || ferror(f)) {
        fatal(NULL, "cannot read job file %s: %s", argv[1], strerror(errno));
    }
    if (in_job) {
        syntax("the last job has no `end`");
    }
    free(line);
    fclose(f);
    return all_clean ? 0 : 1;
}
