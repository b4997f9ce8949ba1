# flowmill: build, generate, test.
#
#   make tools     install clang, llvm, libbpf headers and bpftool (Debian)
#   make test-tools install the peers the tests drive: curl, ss, nft, prometheus,
#                  postgresql, and Jaeger (make jaeger)
#   make jaeger    build the Jaeger v2 binary the tests export traces to, once,
#                  into /var/cache/flowmill-tools
#   make generate  recompile bpf/*.c into the committed probes/*/zz_generated_*
#   make test      run the tests (privileged tests need root)
#   make test-kernels run the privileged suite on other kernels under QEMU
#                  (KERNELS=5.10,6.1 to choose; see internal/vmtest)
#   make test-go   run the Go-internals probes' tests with every supported Go
#   make bench     run the benchmarks
#   make lint      gofmt and go vet

GO ?= go
TEST_FLAGS ?= -race -count=1
# The library and, in a module of their own (go.work joins them), the
# examples, whose exporters the library's users should not inherit.
PKGS ?= ./... ./examples/...

.PHONY: all tools test-tools jaeger generate test test-kernels test-go bench lint check-generated

all: lint test

tools:
	apt-get update
	apt-get install -y --no-install-recommends clang llvm libbpf-dev bpftool

test-tools: jaeger
	apt-get update
	apt-get install -y --no-install-recommends curl iproute2 nftables prometheus \
		qemu-system-x86 busybox-static kmod xz-utils zstd postgresql

# Tools the tests drive that Debian does not package are built from the Go
# module proxy into a cache outside the repository, one directory per
# version, so a fresh checkout (CI's) reuses what an earlier run built.
# internal/testutil looks for them there (FLOWMILL_TOOLS_CACHE moves both).
TOOLS_CACHE ?= $(or $(FLOWMILL_TOOLS_CACHE),/var/cache/flowmill-tools)
# Keep equal to testutil.JaegerVersion (a test checks).
JAEGER_VERSION ?= v1.76.0
JAEGER_BIN ?= $(TOOLS_CACHE)/jaeger-$(JAEGER_VERSION)/jaeger

jaeger: $(JAEGER_BIN)

# Jaeger v2 (an OpenTelemetry Collector distribution). go install refuses it
# (its go.mod has replace directives), so it is built as the tool of a
# throw-away module, not one of ours: neither go.mod requires it. 9-12
# minutes on 2 cores with a cold Go cache, 121 MB. Built under a temporary
# name and renamed, so an interrupted build leaves nothing that looks done.
$(JAEGER_BIN):
	@echo "building Jaeger $(JAEGER_VERSION) into $@ (9-12 minutes on 2 cores with a cold Go cache, seconds with a warm one)"
	@mkdir -p $(@D)
	@set -e; tmp="$@.tmp.$$$$"; mod=$$(mktemp -d); trap 'rm -rf "$$mod" "$$tmp"' EXIT; \
	cd "$$mod"; export GOWORK=off; \
	$(GO) mod init flowmill-tools >/dev/null 2>&1; \
	$(GO) get -tool github.com/jaegertracing/jaeger/cmd/jaeger@$(JAEGER_VERSION) >get.log 2>&1 || { cat get.log; exit 1; }; \
	$(GO) build -o "$$tmp" github.com/jaegertracing/jaeger/cmd/jaeger; \
	mv -f "$$tmp" "$@"

generate:
	$(GO) generate ./...

# Regenerate and fail if the committed objects differ.
check-generated: generate
	git diff --exit-code -- probes/ || { echo "generated eBPF objects are stale: run make generate and commit" >&2; exit 1; }

test:
	$(GO) test $(TEST_FLAGS) $(PKGS)

# The kernels of the matrix are pinned in internal/vmtest/kernels.go.
KERNELS ?= all
# Every package but internal/goexe, which reads ELF files and needs no
# kernel (and builds programs with several Go releases: minutes under
# emulation).
KERNEL_PKGS ?= $(shell $(GO) list $(PKGS) | grep -v '/internal/goexe$$')
test-kernels:
	$(GO) run ./internal/vmtest test -short -kernels $(KERNELS) $(KERNEL_PKGS)

# Go releases whose runtime, net/http and database/sql internals probes/http,
# probes/grpc (the runtime's goroutine ID) and probes/sql read.
GO_RELEASES ?= go1.26.8 go1.27.4
GO_PKGS ?= ./probes/http/ ./probes/grpc/ ./probes/sql/ ./internal/goexe/
test-go:
	for v in $(GO_RELEASES); do GOTOOLCHAIN=$$v $(GO) version && GOTOOLCHAIN=$$v $(GO) test $(TEST_FLAGS) $(GO_PKGS) || exit 1; done

bench:
	$(GO) test -run '^$$' -bench . -benchmem $(PKGS)

lint:
	@out=$$(gofmt -l $$(git ls-files '*.go')); if [ -n "$$out" ]; then echo "gofmt needed:"; echo "$$out"; exit 1; fi
	$(GO) vet $(PKGS)
	# The module builds where the probes cannot run (they report ErrNotSupported).
	GOOS=darwin GOARCH=arm64 $(GO) vet $(PKGS)
	# linux/arm64: the amd64-only families (http) report ErrNotSupported.
	GOOS=linux GOARCH=arm64 $(GO) vet $(PKGS)
	# Each module requires exactly what its packages import.
	@for m in . examples probes/sql/testdata/sqlapp probes/grpc/testdata/clientonly probes/grpc/testdata/v185 probes/http/testdata/cost; do (cd $$m && GOWORK=off GOFLAGS=-mod=mod $(GO) mod tidy -diff) || { echo "go.mod of $$m is not tidy: run go mod tidy there" >&2; exit 1; }; done
