package main

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"
)

// CallResult is what /call answers: one entry per request made.
type CallResult struct {
	Requests []CallRequest `json:"requests"`
}

// CallRequest is one request /call made.
type CallRequest struct {
	Status int    `json:"status"`
	Error  string `json:"error,omitempty"`
	Size   int    `json:"size"`   // body bytes sent
	SHA256 string `json:"sha256"` // of the body sent
}

var (
	clientsMu sync.Mutex
	clients   = map[string]*http.Client{}
)

// client returns the client named kind (see callHandler), one per kind
// and process, so that its connections are kept alive across calls.
func client(kind string, pre *http.Client) (*http.Client, error) {
	clientsMu.Lock()
	defer clientsMu.Unlock()
	if c, ok := clients[kind]; ok {
		return c, nil
	}
	insecure := &tls.Config{InsecureSkipVerify: true}
	var c *http.Client
	switch kind {
	case "default":
		c = http.DefaultClient
	case "custom":
		c = &http.Client{Transport: &http.Transport{MaxConnsPerHost: 1, DisableCompression: true}}
	case "pre":
		c = pre
	case "tls": // HTTP/1.1 over TLS
		c = &http.Client{Transport: &http.Transport{TLSClientConfig: insecure}}
	case "h2": // HTTP/2 over TLS
		c = &http.Client{Transport: &http.Transport{TLSClientConfig: insecure, ForceAttemptHTTP2: true}}
	case "h2c": // HTTP/2 without TLS
		p := new(http.Protocols)
		p.SetUnencryptedHTTP2(true)
		c = &http.Client{Transport: &http.Transport{Protocols: p}}
	case "wrapped": // a net.Conn of its own type
		d := &net.Dialer{}
		c = &http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			conn, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			return wrappedConn{conn}, nil
		}}}
	default:
		return nil, fmt.Errorf("unknown client %q", kind)
	}
	if kind != "pre" {
		c.Timeout = timeout(20 * time.Second)
	}
	clients[kind] = c
	return c, nil
}

type wrappedConn struct{ net.Conn }

// Body returns the deterministic body of request i of a call with seed.
func Body(seed uint64, i, size int) []byte {
	r := rand.New(rand.NewPCG(seed, uint64(i)))
	b := make([]byte, size)
	for k := range b {
		b[k] = byte(r.Uint32())
	}
	return b
}

// callHandler makes the requests asked for by the query:
//
//	url      where (required)
//	client   default, custom, pre, tls, h2, h2c, wrapped (default: default)
//	method   GET (default), POST
//	body     "" (none), fixed (Content-Length), chunked (unknown length),
//	         file (from a file: sendfile)
//	size     body size in bytes
//	n        sequential requests (default 1), headers X-Seq: 0..n-1
//	seed     of the bodies
//	hname, hvalue  a header set as is (its name's case kept)
//	big      bytes of an X-Big header
//	ctx      request (r.Context(), default) or background
func callHandler(pre *http.Client) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) {
		q := r.URL.Query()
		kind := q.Get("client")
		if kind == "" {
			kind = "default"
		}
		c, err := client(kind, pre)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		n, _ := strconv.Atoi(q.Get("n"))
		n = max(n, 1)
		size, _ := strconv.Atoi(q.Get("size"))
		seed, _ := strconv.ParseUint(q.Get("seed"), 10, 64)
		big, _ := strconv.Atoi(q.Get("big"))
		method := q.Get("method")
		if method == "" {
			method = "GET"
		}
		ctx := r.Context()
		if q.Get("ctx") == "background" {
			ctx = context.Background()
		}
		var res CallResult
		for i := range n {
			body := Body(seed, i, size)
			var rd io.Reader
			switch q.Get("body") {
			case "fixed":
				rd = strings.NewReader(string(body))
			case "chunked":
				rd = io.MultiReader(strings.NewReader(string(body))) // no length known
			case "file":
				f, err := os.CreateTemp("", "flowmill-body-")
				if err != nil {
					http.Error(w, err.Error(), http.StatusInternalServerError)
					return
				}
				os.Remove(f.Name())
				f.Write(body)
				f.Seek(0, io.SeekStart)
				defer f.Close()
				rd = f
			}
			req, err := http.NewRequestWithContext(ctx, method, q.Get("url"), rd)
			if err != nil {
				http.Error(w, err.Error(), http.StatusBadRequest)
				return
			}
			if f, ok := rd.(*os.File); ok {
				req.ContentLength = int64(size)
				req.Body = f // an *os.File: net/http sends it with sendfile
			}
			req.Header.Set("X-Seq", strconv.Itoa(i))
			if name := q.Get("hname"); name != "" {
				req.Header[name] = []string{q.Get("hvalue")}
			}
			if big > 0 {
				req.Header.Set("X-Big", strings.Repeat("b", big))
			}
			cr := CallRequest{Size: len(body)}
			if q.Get("body") != "" {
				h := sha256.Sum256(body)
				cr.SHA256 = hex.EncodeToString(h[:])
			}
			resp, err := c.Do(req)
			if err != nil {
				cr.Error = err.Error()
			} else {
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				cr.Status = resp.StatusCode
			}
			res.Requests = append(res.Requests, cr)
		}
		json.NewEncoder(w).Encode(res)
	}
}
