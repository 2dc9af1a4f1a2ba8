{{/* Labels on every object this chart renders itself. */}}
{{- define "seamless.labels" -}}
app.kubernetes.io/name: seamless-airflow
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: seamless
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "seamless.taskNamespace" -}}
{{- .Values.tasks.namespace.name -}}
{{- end }}

{{- define "seamless.launcherNamespace" -}}
{{- default .Release.Namespace .Values.rbac.launcherNamespace -}}
{{- end }}

{{- define "seamless.workerImage" -}}
{{- printf "%s:%s" .Values.worker.image.repository .Values.worker.image.tag -}}
{{- end }}

{{/* The Airflow image of the official chart's values (images.airflow, else its defaults). */}}
{{- define "seamless.airflowImage" -}}
{{- $af := .Values.airflow -}}
{{- $img := (($af.images | default dict).airflow | default dict) -}}
{{- $repo := $img.repository | default $af.defaultAirflowRepository | default "apache/airflow" -}}
{{- $tag := $img.tag | default $af.defaultAirflowTag | required "airflow.images.airflow.tag or airflow.defaultAirflowTag is required" -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end }}

{{/* Secret (key `connection`) with the Airflow metadata DB URL, for the pool Job. */}}
{{- define "seamless.metadataSecretName" -}}
{{- $af := .Values.airflow -}}
{{- $data := $af.data | default dict -}}
{{- if .Values.airflowPool.createJob.metadataSecretName -}}
{{- .Values.airflowPool.createJob.metadataSecretName -}}
{{- else if $data.metadataSecretName -}}
{{- $data.metadataSecretName -}}
{{- else -}}
{{- printf "%s-metadata" (required "airflow.fullnameOverride (or airflowPool.createJob.metadataSecretName) is required to find the metadata DB Secret" $af.fullnameOverride) -}}
{{- end -}}
{{- end }}

{{/* Projected volume with the storage credentials, named as CloudVolume expects them. */}}
{{- define "seamless.secretVolumes" -}}
{{- $sources := list -}}
{{- with .Values.secrets.gcs -}}
{{- if .enabled -}}
{{- $sources = append $sources (dict "secret" (dict "name" .secretName "optional" false "items" (list (dict "key" .key "path" "google-secret.json")))) -}}
{{- end -}}
{{- end -}}
{{- with .Values.secrets.aws -}}
{{- if .enabled -}}
{{- $sources = append $sources (dict "secret" (dict "name" .secretName "optional" false "items" (list (dict "key" .key "path" "aws-secret.json")))) -}}
{{- end -}}
{{- end -}}
{{- if $sources -}}
{{- list (dict "name" "seamless-secrets" "projected" (dict "sources" $sources "defaultMode" 292)) | toJson -}}
{{- else -}}
[]
{{- end -}}
{{- end }}

{{/*
The DAG-facing settings (the contract with SeamlessPodOperator), one JSON document. Pod-spec fragments are
in Kubernetes' own field names so they can go into a pod spec as they are.
*/}}
{{- define "seamless.dagSettings" -}}
{{- $volumes := include "seamless.secretVolumes" . | fromJsonArray -}}
{{- $mounts := list -}}
{{- $env := list -}}
{{- if $volumes -}}
{{- $mounts = list (dict "name" "seamless-secrets" "mountPath" .Values.secrets.mountPath "readOnly" true) -}}
{{- end -}}
{{- if .Values.secrets.gcs.enabled -}}
{{- $env = append $env (dict "name" "GOOGLE_APPLICATION_CREDENTIALS" "value" (printf "%s/google-secret.json" (trimSuffix "/" .Values.secrets.mountPath))) -}}
{{- end -}}
{{- $pullSecrets := list -}}
{{- range .Values.tasks.imagePullSecrets -}}
{{- $pullSecrets = append $pullSecrets (dict "name" .) -}}
{{- end -}}
{{- $uid := int .Values.worker.uid -}}
{{- $gpuLimits := dict .Values.gpuPool.resourceName (int .Values.gpuPool.gpusPerPod) -}}
{{- $settings := dict
  "schema_version" 1
  "namespace" (include "seamless.taskNamespace" .)
  "service_account" .Values.tasks.serviceAccount.name
  "priority_class" .Values.tasks.priorityClass.name
  "pod_labels" .Values.tasks.podLabels
  "image" (include "seamless.workerImage" .)
  "image_pull_policy" .Values.worker.image.pullPolicy
  "image_pull_secrets" $pullSecrets
  "airflow_pool" .Values.airflowPool.name
  "airflow_pool_slots" (int .Values.airflowPool.slots)
  "gpu" (dict "node_selector" .Values.gpuPool.nodeSelector "tolerations" .Values.gpuPool.tolerations "resource_name" .Values.gpuPool.resourceName "per_pod" (int .Values.gpuPool.gpusPerPod) "limits" $gpuLimits)
  "cpu" (dict "node_selector" .Values.cpuPool.nodeSelector "tolerations" .Values.cpuPool.tolerations)
  "secret_names" (dict "gcs" (ternary .Values.secrets.gcs.secretName "" .Values.secrets.gcs.enabled) "aws" (ternary .Values.secrets.aws.secretName "" .Values.secrets.aws.enabled))
  "volumes" $volumes
  "volume_mounts" $mounts
  "env" $env
  "pod_security_context" (dict "runAsNonRoot" true "runAsUser" $uid "runAsGroup" $uid "fsGroup" $uid "seccompProfile" (dict "type" "RuntimeDefault"))
  "container_security_context" (dict "allowPrivilegeEscalation" false "readOnlyRootFilesystem" true "capabilities" (dict "drop" (list "ALL")))
-}}
{{- $settings | toJson -}}
{{- end }}
