//go:build e2e

// End-to-end tests against a real local cluster: `make e2e`, or
//
//	go test -tags e2e -count=1 -timeout 80m -v ./tests/e2e/...
//
// See docs/testing.md for how the cluster is built and how to add a scenario.
package e2e

import (
	"os"
	"testing"

	"github.com/tessera-gpu/tessera/tests/e2e/framework"
)

func TestMain(m *testing.M) {
	os.Exit(framework.Run(m))
}
