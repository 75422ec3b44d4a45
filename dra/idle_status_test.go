package dra

import (
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/tessera-gpu/tessera/telemetry"
)

// The telemetry's idle finding reaches the claim's device status as condition Idle (True, then False
// once busy), and a finding that arrives after Unprepare brings no status back.
func TestIdleConditionInClaimStatus(t *testing.T) {
	e := mixedEnv(t)
	c := e.claim("idle", []alloc{{"gpu", "gpu-0", false}})
	e.mustPrepare(c)
	h := telemetry.Holding{Device: "gpu-0", Claim: c.Namespace + "/" + c.Name}
	idleCond := func() *metav1.Condition {
		for _, s := range claimStatus(t, e, c) {
			for i := range s.Conditions {
				if s.Conditions[i].Type == ConditionIdle {
					return &s.Conditions[i]
				}
			}
		}
		return nil
	}
	e.d.IdleChanged(h, true, "held for 30m with GPU 0 utilization at most 5%")
	poll(t, "Idle True", func() (bool, error) {
		ic := idleCond()
		return ic != nil && ic.Status == metav1.ConditionTrue && ic.Reason == ReasonIdle && ic.Message != "", nil
	})
	e.d.IdleChanged(h, false, "")
	poll(t, "Idle False", func() (bool, error) {
		ic := idleCond()
		return ic != nil && ic.Status == metav1.ConditionFalse && ic.Reason == ReasonBusy, nil
	})
	if err := e.unprepare(c); err != nil {
		t.Fatal(err)
	}
	poll(t, "status removed", func() (bool, error) { return len(claimStatus(t, e, c)) == 0, nil })
	e.d.IdleChanged(h, true, "late")
	time.Sleep(3 * statusDelay)
	if st := claimStatus(t, e, c); len(st) != 0 {
		t.Errorf("a finding after Unprepare wrote the claim's status again: %+v", st)
	}
}
