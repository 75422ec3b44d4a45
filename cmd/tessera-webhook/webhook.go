package main

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"strings"

	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	resourcev1 "k8s.io/api/resource/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/klog/v2"

	"github.com/tessera-gpu/tessera/api"
)

// maxBody bounds an AdmissionReview; the API server sends at most about 3 MiB of object.
const maxBody = 8 << 20

// Paths the webhook serves. /validate takes every kind; the others are kept for configurations that
// register one path per kind.
const (
	PathValidate      = "/validate"
	PathConfigMap     = "/validate-configmap"
	PathResourceClaim = "/validate-resourceclaim"
)

func newMux() *http.ServeMux {
	mux := http.NewServeMux()
	mux.HandleFunc(PathValidate, serveAdmission)
	mux.HandleFunc(PathConfigMap, serveAdmission)
	mux.HandleFunc(PathResourceClaim, serveAdmission)
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
	return mux
}

func serveAdmission(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		http.Error(w, "use POST with an AdmissionReview", http.StatusMethodNotAllowed)
		return
	}
	if ct := r.Header.Get("Content-Type"); ct != "" && !strings.HasPrefix(ct, "application/json") {
		http.Error(w, "want Content-Type application/json", http.StatusUnsupportedMediaType)
		return
	}
	body, err := io.ReadAll(io.LimitReader(r.Body, maxBody+1))
	if err != nil || len(body) > maxBody {
		http.Error(w, "request body unreadable or too large", http.StatusRequestEntityTooLarge)
		return
	}
	var review admissionv1.AdmissionReview
	if err := json.Unmarshal(body, &review); err != nil || review.Request == nil {
		http.Error(w, "want an admission.k8s.io/v1 AdmissionReview with a request", http.StatusBadRequest)
		return
	}
	resp := review2response(review.Request)
	out := admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Response: resp,
	}
	w.Header().Set("Content-Type", "application/json")
	if err := json.NewEncoder(w).Encode(out); err != nil {
		klog.ErrorS(err, "Writing admission response failed")
	}
}

// review2response decides one admission request.
func review2response(req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse {
	resp := &admissionv1.AdmissionResponse{UID: req.UID, Allowed: true}
	if req.Operation == admissionv1.Delete || len(req.Object.Raw) == 0 {
		return resp
	}
	errs, warns := review(req)
	resp.Warnings = warns.Strings()
	if len(errs) > 0 {
		resp.Allowed = false
		msg := fmt.Sprintf("%s %s is not valid for Tessera: %s", req.Kind.Kind, objectName(req), errs.Error())
		resp.Result = &metav1.Status{
			Status:  metav1.StatusFailure,
			Code:    http.StatusUnprocessableEntity,
			Reason:  metav1.StatusReasonInvalid,
			Message: msg,
		}
		klog.InfoS("Admission denied", "kind", req.Kind.Kind, "namespace", req.Namespace, "name", objectName(req), "errors", len(errs), "first", errs[0].Error())
	}
	return resp
}

func objectName(req *admissionv1.AdmissionRequest) string {
	if req.Name != "" {
		return req.Name
	}
	var meta struct {
		Metadata metav1.ObjectMeta `json:"metadata"`
	}
	_ = json.Unmarshal(req.Object.Raw, &meta)
	if meta.Metadata.Name != "" {
		return meta.Metadata.Name
	}
	if meta.Metadata.GenerateName != "" {
		return meta.Metadata.GenerateName + "…"
	}
	return "(unnamed)"
}

// review validates the object of a request; it returns field errors and warnings.
func review(req *admissionv1.AdmissionRequest) (api.ErrorList, api.Warnings) {
	raw := req.Object.Raw
	switch req.Kind.Kind {
	case "ConfigMap":
		var cm corev1.ConfigMap
		if err := json.Unmarshal(raw, &cm); err != nil {
			return api.ErrorList{{Message: "not a ConfigMap: " + err.Error()}}, nil
		}
		return reviewConfigMap(&cm)
	case "ResourceClaim":
		var rc resourcev1.ResourceClaim
		if err := json.Unmarshal(raw, &rc); err != nil {
			return api.ErrorList{{Message: "not a ResourceClaim: " + err.Error()}}, nil
		}
		return reviewClaimConfigs(claimConfigs(rc.Spec.Devices.Config), "spec.devices.config"), nil
	case "ResourceClaimTemplate":
		var t resourcev1.ResourceClaimTemplate
		if err := json.Unmarshal(raw, &t); err != nil {
			return api.ErrorList{{Message: "not a ResourceClaimTemplate: " + err.Error()}}, nil
		}
		return reviewClaimConfigs(claimConfigs(t.Spec.Spec.Devices.Config), "spec.spec.devices.config"), nil
	case "DeviceClass":
		var dc resourcev1.DeviceClass
		if err := json.Unmarshal(raw, &dc); err != nil {
			return api.ErrorList{{Message: "not a DeviceClass: " + err.Error()}}, nil
		}
		var cfgs []resourcev1.DeviceConfiguration
		for _, c := range dc.Spec.Config {
			cfgs = append(cfgs, c.DeviceConfiguration)
		}
		return reviewClaimConfigs(cfgs, "spec.config"), nil
	}
	return nil, nil // not ours to judge
}

func reviewConfigMap(cm *corev1.ConfigMap) (api.ErrorList, api.Warnings) {
	if cm.Labels[api.ConfigMapLabel] != "true" {
		return nil, nil
	}
	data := map[string]string{}
	for k, v := range cm.Data {
		data[k] = v
	}
	for k := range cm.BinaryData {
		return api.ErrorList{{Path: "binaryData[" + k + "]", Message: "profiles are text", Fix: "move the profile to data"}}, nil
	}
	_, warns, err := api.ParseConfigMapData(data)
	return api.AsErrorList(err), warns
}

func claimConfigs(in []resourcev1.DeviceClaimConfiguration) []resourcev1.DeviceConfiguration {
	out := make([]resourcev1.DeviceConfiguration, len(in))
	for i, c := range in {
		out[i] = c.DeviceConfiguration
	}
	return out
}

// reviewClaimConfigs validates the opaque parameters meant for Tessera's driver.
func reviewClaimConfigs(cfgs []resourcev1.DeviceConfiguration, path string) api.ErrorList {
	var errs api.ErrorList
	for i, c := range cfgs {
		if c.Opaque == nil || c.Opaque.Driver != api.DriverName {
			continue
		}
		p := fmt.Sprintf("%s[%d].opaque.parameters", path, i)
		if len(c.Opaque.Parameters.Raw) == 0 {
			errs = append(errs, &api.FieldError{Path: p, Message: "parameters are empty", Fix: "write a GPUConfig (apiVersion " + api.ConfigAPIVersion + ", kind GPUConfig)"})
			continue
		}
		if _, err := api.ParseGPUConfig(c.Opaque.Parameters.Raw); err != nil {
			errs = append(errs, api.AsErrorList(err).Prefixed(p)...)
		}
	}
	return errs
}
