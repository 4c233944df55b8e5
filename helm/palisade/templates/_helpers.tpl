{{/*
Names, labels and shared values of the Palisade chart.
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "palisade.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: fullnameOverride, else the release name when
it already contains the chart name, else "<release>-<chart>".
*/}}
{{- define "palisade.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Deployment, Service, ServiceAccount, ClusterRole(Binding), PDB, ServiceMonitor. */}}
{{- define "palisade.controlPlane.name" -}}
{{- printf "%s-control-plane" (include "palisade.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The MutatingWebhookConfiguration (cluster-scoped). */}}
{{- define "palisade.webhook.name" -}}
{{- printf "%s-sidecar-injector" (include "palisade.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The ConfigMap holding the injection config file. */}}
{{- define "palisade.injection.name" -}}
{{- printf "%s-injection" (include "palisade.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The PodMonitor of the injected sidecars. */}}
{{- define "palisade.sidecar.name" -}}
{{- printf "%s-sidecars" (include "palisade.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The CA Secret: the user's, or the one the chart creates. */}}
{{- define "palisade.ca.secretName" -}}
{{- if .Values.ca.create }}
{{- printf "%s-ca" (include "palisade.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- .Values.ca.existingSecret }}
{{- end }}
{{- end }}

{{/* DNS name of the control plane's Service inside the cluster. */}}
{{- define "palisade.controlPlane.host" -}}
{{- printf "%s.%s.svc" (include "palisade.controlPlane.name" .) .Release.Namespace }}
{{- end }}

{{/*
PALISADE_SERVER_NAMES: every name a client may use for the Service; the one
serving certificate covers both gRPC and the webhook.
*/}}
{{- define "palisade.controlPlane.serverNames" -}}
{{- $svc := include "palisade.controlPlane.name" . }}
{{- $ns := .Release.Namespace }}
{{- list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.%s" $svc $ns .Values.clusterDomain) | join "," }}
{{- end }}

{{/* host:port to listen on; an IPv6 host is bracketed. Args: list $ port. */}}
{{- define "palisade.listenAddr" -}}
{{- $root := index . 0 }}
{{- $host := $root.Values.controlPlane.bindAddress }}
{{- if contains ":" $host }}
{{- printf "[%s]:%d" $host (int (index . 1)) }}
{{- else }}
{{- printf "%s:%d" $host (int (index . 1)) }}
{{- end }}
{{- end }}

{{/*
An image reference: repository@digest, else repository:tag (tag defaults to
the chart's appVersion). Args: dict "image" <values> "root" $.
*/}}
{{- define "palisade.image" -}}
{{- $image := .image }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default .root.Chart.AppVersion $image.tag | toString) }}
{{- end }}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "palisade.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/name: {{ include "palisade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: palisade
{{- end }}

{{/* Labels of the control-plane objects. */}}
{{- define "palisade.controlPlane.labels" -}}
{{ include "palisade.labels" . }}
app.kubernetes.io/component: control-plane
{{- end }}

{{/* Selector of the control-plane pods (stable across upgrades). */}}
{{- define "palisade.controlPlane.selectorLabels" -}}
app.kubernetes.io/name: {{ include "palisade.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{/* terminationGracePeriodSeconds: the value, or the drain time plus 15 s. */}}
{{- define "palisade.controlPlane.terminationGrace" -}}
{{- $grace := int .Values.controlPlane.shutdownGraceSeconds }}
{{- $set := .Values.controlPlane.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $set }}
{{- add $grace 15 }}
{{- else if le (int $set) $grace }}
{{- fail (printf "controlPlane.terminationGracePeriodSeconds (%d) must be larger than controlPlane.shutdownGraceSeconds (%d): kubelet would kill the control plane while it drains" (int $set) $grace) }}
{{- else }}
{{- int $set }}
{{- end }}
{{- end }}

{{/* Stops the render unless exactly one CA source is chosen. */}}
{{- define "palisade.ca.validate" -}}
{{- if and .Values.ca.create .Values.ca.existingSecret }}
{{- fail (printf "ca: choose one CA source: either ca.create=true (the chart creates the CA Secret) or ca.existingSecret=%q with ca.create=false, not both" .Values.ca.existingSecret) }}
{{- end }}
{{- if and (not .Values.ca.create) (not .Values.ca.existingSecret) }}
{{- fail "ca: no CA source: set ca.create=true (the chart creates a root CA) or ca.existingSecret=<name of a kubernetes.io/tls Secret with tls.crt, tls.key, ca.crt in the release namespace>" }}
{{- end }}
{{- end }}

{{/*
The CA material of a chart-created CA, as JSON {"tls.crt","tls.key","ca.crt"}
(base64, the Secret's data form).

The Secret is created once: the three keys of an existing Secret of that name
(an earlier revision, or one kept after an uninstall) are reused byte for
byte, so an upgrade never replaces the root and a rotation done by editing the
Secret survives upgrades. Otherwise a fresh ECDSA P-256 root is generated. The
result is cached on the root context so the Secret and the webhook's
caBundle, which render in different templates, see the same certificate.
*/}}
{{- define "palisade.ca.material" -}}
{{- if not (hasKey . "palisadeCAMaterial") }}
{{- $existing := lookup "v1" "Secret" .Release.Namespace (include "palisade.ca.secretName" .) }}
{{- $data := dig "data" dict $existing }}
{{- $material := dict }}
{{- if and (hasKey $data "tls.crt") (hasKey $data "tls.key") }}
{{- $material = dict "tls.crt" (index $data "tls.crt") "tls.key" (index $data "tls.key") "ca.crt" (index $data "ca.crt" | default (index $data "tls.crt")) }}
{{- else }}
{{- $key := genPrivateKey "ecdsa" }}
{{- $root := genCAWithKey .Values.ca.commonName (int .Values.ca.validityDays) $key }}
{{- $material = dict "tls.crt" ($root.Cert | b64enc) "tls.key" ($root.Key | b64enc) "ca.crt" ($root.Cert | b64enc) }}
{{- end }}
{{- $_ := set . "palisadeCAMaterial" $material }}
{{- end }}
{{- get . "palisadeCAMaterial" | toJson }}
{{- end }}
