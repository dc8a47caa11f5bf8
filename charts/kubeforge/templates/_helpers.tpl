{{- define "kubeforge.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{ include "kubeforge.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeforge
{{- end -}}

{{- define "kubeforge.selectorLabels" -}}
app.kubernetes.io/name: kubeforge
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubeforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubeforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "kubeforge.workloadImage" -}}
{{- printf "%s:%s" .Values.workloadImage.repository (.Values.workloadImage.tag | default .Chart.AppVersion) -}}
{{- end -}}

{{- define "kubeforge.peering" -}}
{{- if gt (int .Values.replicaCount) 1 }}{{ .Values.peering.name }}{{ end -}}
{{- end -}}

{{- define "kubeforge.checks" -}}
{{- if and .Values.rbac.create (not .Values.rbac.clusterWide) (not .Values.watchNamespaces) -}}
{{- fail "rbac.clusterWide=false needs watchNamespaces: the Roles are created in those namespaces" -}}
{{- end -}}
{{- end -}}
