{{/* Names and labels. */}}
{{- define "tessera.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tessera.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "tessera.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "tessera.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tessera.labels" -}}
app.kubernetes.io/name: {{ include "tessera.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: include "tessera.selector" (list . "device-plugin") */}}
{{- define "tessera.selector" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "tessera.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "tessera.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The simulated node's name when nvml is sim:<node>, else "". */}}
{{- define "tessera.simNode" -}}
{{- if hasPrefix "sim:" .Values.nvml -}}{{ trimPrefix "sim:" .Values.nvml }}{{- end -}}
{{- end -}}

{{- define "tessera.simStateDir" -}}
{{- printf "%s/sim/%s" .Values.hostPaths.stateDir (include "tessera.simNode" .) -}}
{{- end -}}

{{/*
Container security: privileged where NVML management or /dev/nvidia* without the NVIDIA runtime
needs it (a value per component), else nothing: every capability dropped, read-only root, no
privilege escalation, the runtime's default seccomp profile. Node daemons run as root (they write
into root-owned kubelet and CDI directories).
*/}}
{{- define "tessera.nodeSecurityContext" -}}
{{- if . -}}
privileged: true
readOnlyRootFilesystem: true
runAsUser: 0
{{- else -}}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsUser: 0
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
{{- end -}}

{{/* Environment every node container gets. */}}
{{- define "tessera.nodeEnv" -}}
- name: NODE_NAME
  valueFrom:
    fieldRef: {fieldPath: spec.nodeName}
- name: TESSERA_NVML
  value: {{ .Values.nvml | quote }}
{{- if include "tessera.simNode" . }}
- name: TESSERA_SIM_STATE
  value: {{ include "tessera.simStateDir" . | quote }}
{{- else }}
# libnvidia-ml comes from the host's driver root, mounted here.
- name: TESSERA_DRIVER_ROOT
  value: /driver-root
{{- end }}
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* Pod-level settings every node DaemonSet shares. */}}
{{- define "tessera.nodePodSpec" -}}
priorityClassName: {{ .Values.priorityClassName }}
hostNetwork: {{ .Values.hostNetwork }}
{{- if .Values.hostNetwork }}
dnsPolicy: ClusterFirstWithHostNet
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The simulated node's state: a host path, mounted at the same path (CDI specs name its files). */}}
{{- define "tessera.simVolume" -}}
{{- if include "tessera.simNode" . -}}
- name: sim-state
  hostPath: {path: {{ include "tessera.simStateDir" . }}, type: DirectoryOrCreate}
{{- end -}}
{{- end -}}
{{- define "tessera.simMount" -}}
{{- if include "tessera.simNode" . -}}
- {name: sim-state, mountPath: {{ include "tessera.simStateDir" . }}}
{{- end -}}
{{- end -}}

{{- define "tessera.profileConfigMap" -}}
{{- if .Values.sharingProfiles.create -}}{{ .Values.sharingProfiles.name }}{{- else -}}{{ required "sharingProfiles.name must name an existing ConfigMap when sharingProfiles.create is false" .Values.sharingProfiles.name }}{{- end -}}
{{- end -}}

{{/* host:port of a metrics address value, for probes: the port. */}}
{{- define "tessera.port" -}}
{{- regexReplaceAll "^.*:" . "" -}}
{{- end -}}

{{/*
The liveness probe's host for a metrics address on the host network: its own host, or 127.0.0.1
for an unspecified one. Off the host network the probe goes to the pod IP, which a loopback
address never answers: refused at render time.
  include "tessera.probeHost" (list $addr $.Values.hostNetwork "devicePlugin")
*/}}
{{- define "tessera.probeHost" -}}
{{- $addr := index . 0 -}}{{- $hostNet := index . 1 -}}{{- $what := index . 2 -}}
{{- $host := regexReplaceAll ":[0-9]*$" $addr "" | trimPrefix "[" | trimSuffix "]" -}}
{{- $loopback := or (eq $host "127.0.0.1") (eq $host "localhost") (eq $host "::1") -}}
{{- if and (not $hostNet) $loopback -}}
{{- fail (printf "%s.metrics.address %q listens on loopback, where the kubelet's liveness probe (at the pod's IP) cannot reach it: use \":<port>\", or hostNetwork: true" $what $addr) -}}
{{- end -}}
{{- if or (eq $host "") (eq $host "0.0.0.0") (eq $host "::") -}}127.0.0.1{{- else -}}{{ $host }}{{- end -}}
{{- end -}}
