# flowmill: build, generate, test.
#
#   make tools     install clang, llvm, libbpf headers and bpftool (Debian)
#   make test-tools install the peers the tests drive: curl, ss, nft, prometheus
#   make generate  recompile bpf/*.c into the committed probes/*/zz_generated_*
#   make test      run the tests (privileged tests need root)
#   make test-kernels run the privileged suite on other kernels under QEMU
#                  (KERNELS=5.10,6.1 to choose; see internal/vmtest)
#   make test-go   run the Go-internals probes' tests with every supported Go
#   make bench     run the benchmarks
#   make lint      gofmt and go vet

GO ?= go
TEST_FLAGS ?= -race -count=1

.PHONY: all tools test-tools generate test test-kernels test-go bench lint check-generated

all: lint test

tools:
	apt-get update
	apt-get install -y --no-install-recommends clang llvm libbpf-dev bpftool

test-tools:
	apt-get update
	apt-get install -y --no-install-recommends curl iproute2 nftables prometheus \
		qemu-system-x86 busybox-static kmod xz-utils zstd

generate:
	$(GO) generate ./...

# Regenerate and fail if the committed objects differ.
check-generated: generate
	git diff --exit-code -- probes/ || { echo "generated eBPF objects are stale: run make generate and commit" >&2; exit 1; }

test:
	$(GO) test $(TEST_FLAGS) ./...

# The kernels of the matrix are pinned in internal/vmtest/kernels.go.
KERNELS ?= all
# Every package but internal/goexe, which reads ELF files and needs no
# kernel (and builds programs with several Go releases: minutes under
# emulation).
KERNEL_PKGS ?= $(shell $(GO) list ./... | grep -v '/internal/goexe$$')
test-kernels:
	$(GO) run ./internal/vmtest test -short -kernels $(KERNELS) $(KERNEL_PKGS)

# Go releases whose runtime and net/http internals probes/http reads.
GO_RELEASES ?= go1.26.8 go1.27.4
GO_PKGS ?= ./probes/http/ ./internal/goexe/
test-go:
	for v in $(GO_RELEASES); do GOTOOLCHAIN=$$v $(GO) version && GOTOOLCHAIN=$$v $(GO) test $(TEST_FLAGS) $(GO_PKGS) || exit 1; done

bench:
	$(GO) test -run '^$$' -bench . -benchmem ./...

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet ./...
	# The module builds where the probes cannot run (they report ErrNotSupported).
	GOOS=darwin GOARCH=arm64 $(GO) vet ./...
	# linux/arm64: the amd64-only families (http) report ErrNotSupported.
	GOOS=linux GOARCH=arm64 $(GO) vet ./...
