// Command tessera-webhook is Tessera's validating admission webhook. It refuses, at admission, a
// profile ConfigMap (label tessera.dev/sharing-profiles=true) whose profiles do not validate, and a
// ResourceClaim, ResourceClaimTemplate or DeviceClass whose opaque parameters for driver
// gpu.tessera.dev are not a valid GPUConfig, so a bad claim never reaches a node. Every denial
// names the field and the fix.
package main

import (
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"sync"
	"syscall"
	"time"

	"k8s.io/klog/v2"
)

type options struct {
	certFile, keyFile, address string
	port                       int
}

func main() {
	var o options
	fs := flag.NewFlagSet("tessera-webhook", flag.ExitOnError)
	fs.StringVar(&o.certFile, "tls-cert-file", "", "serving certificate (PEM); required")
	fs.StringVar(&o.keyFile, "tls-key-file", "", "private key of the serving certificate (PEM); required")
	fs.StringVar(&o.address, "address", "127.0.0.1", "address to listen on (0.0.0.0 in a Pod)")
	fs.IntVar(&o.port, "port", 8443, "port to listen on")
	klog.InitFlags(fs)
	_ = fs.Parse(os.Args[1:])
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, o, nil)
	stop()
	klog.Flush()
	if err != nil {
		fmt.Fprintln(os.Stderr, "tessera-webhook:", err)
		os.Exit(1)
	}
}

// run serves until ctx ends. ready, if not nil, receives the listening address.
func run(ctx context.Context, o options, ready chan<- string) error {
	if o.certFile == "" || o.keyFile == "" {
		return errors.New("--tls-cert-file and --tls-key-file are required")
	}
	if _, err := tls.LoadX509KeyPair(o.certFile, o.keyFile); err != nil {
		return fmt.Errorf("loading the serving certificate: %w", err)
	}
	certs := &certReloader{certFile: o.certFile, keyFile: o.keyFile}
	ln, err := net.Listen("tcp", net.JoinHostPort(o.address, strconv.Itoa(o.port)))
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           newMux(),
		ReadHeaderTimeout: 10 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      30 * time.Second,
		TLSConfig:         &tls.Config{MinVersion: tls.VersionTLS12, GetCertificate: certs.get},
	}
	klog.InfoS("Serving admission webhook", "address", ln.Addr().String())
	if ready != nil {
		ready <- ln.Addr().String()
	}
	errc := make(chan error, 1)
	go func() { errc <- srv.ServeTLS(ln, "", "") }()
	select {
	case err := <-errc:
		return err
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	return srv.Shutdown(sctx)
}

// certReloader serves the certificate files and reloads them when they change (cert-manager and
// kubelet-mounted Secrets rotate them in place).
type certReloader struct {
	certFile, keyFile string
	mu                sync.Mutex
	cert              *tls.Certificate
	mod               time.Time
}

func (c *certReloader) get(*tls.ClientHelloInfo) (*tls.Certificate, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	st, err := os.Stat(c.certFile)
	if err == nil && (c.cert == nil || st.ModTime() != c.mod) {
		if cert, lerr := tls.LoadX509KeyPair(c.certFile, c.keyFile); lerr == nil {
			c.cert, c.mod = &cert, st.ModTime()
		} else if c.cert == nil {
			return nil, lerr
		}
	}
	if c.cert == nil {
		return nil, fmt.Errorf("no serving certificate: %v", err)
	}
	return c.cert, nil
}
