package telemetry_test

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tessera-gpu/tessera/telemetry"
)

// A daemon whose metrics port is still held (the instance it replaces in a rolling update) serves
// as soon as the port is free; without waiting, the busy port is an error naming the flag.
func TestServeWaitsForBusyPort(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	old, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := old.Addr().String()
	h := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = io.WriteString(w, "tessera_up 1\n") })
	if _, err := telemetry.Serve(ctx, addr, h); err == nil || !strings.Contains(err.Error(), "--metrics-address") {
		t.Fatalf("busy port without waiting: %v", err)
	}
	got, err := telemetry.ServeWaiting(ctx, addr, h, 20*time.Millisecond)
	if err != nil || got != "" {
		t.Fatalf("ServeWaiting on a busy port: %q %v, want to wait", got, err)
	}
	old.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		resp, err := http.Get("http://" + addr + "/metrics")
		if err == nil {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if !strings.Contains(string(body), "tessera_up 1") {
				t.Fatalf("body %q", body)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("not serving after the port was freed: %v", err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	resp, err := http.Get("http://" + addr + "/healthz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("healthz: %v", err)
	}
	resp.Body.Close()
}
