{{- define "kaiko-bridge.name" -}}{{ .Chart.Name }}{{- end -}}
{{- define "kaiko-bridge.fullname" -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" }}{{- end -}}
{{- define "kaiko-bridge.labels" -}}
app.kubernetes.io/name: {{ include "kaiko-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}
{{- define "kaiko-bridge.selector" -}}
app.kubernetes.io/name: {{ include "kaiko-bridge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}
