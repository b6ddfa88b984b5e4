{{/* Chart name, truncated to a DNS label. */}}
{{- define "mpnn-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name of the release's objects: the release name if it already contains the
chart name (e.g. release "mpnn-operator"), else "<release>-<chart>".
*/}}
{{- define "mpnn-operator.fullname" -}}
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

{{- define "mpnn-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object of the release. */}}
{{- define "mpnn-operator.labels" -}}
helm.sh/chart: {{ include "mpnn-operator.chart" . }}
{{ include "mpnn-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: mpnn
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The Deployment's selector (immutable: never add to it). */}}
{{- define "mpnn-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mpnn-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "mpnn-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "mpnn-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "mpnn-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
RBAC rules for the namespaced resources the operator reads and writes: in a
ClusterRole when it watches every namespace, else in a Role per watched namespace.
Each rule is justified in docs/install.md ("Permissions").
*/}}
{{- define "mpnn-operator.namespacedRules" -}}
# NeuralNetworks: kopf lists and watches them and patches its finalizer and
# annotations; the reconciler reads each one afresh.
- apiGroups: [mpnn.dev]
  resources: [neuralnetworks]
  verbs: [get, list, watch, patch]
# status (phase, conditions, partitions, lookupVersion) by merge patch.
- apiGroups: [mpnn.dev]
  resources: [neuralnetworks/status, partitions/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion to their NeuralNetwork;
# where the OwnerReferencesPermissionEnforcement admission plugin is enabled,
# that requires update on the owner's finalizers subresource.
- apiGroups: [mpnn.dev]
  resources: [neuralnetworks/finalizers]
  verbs: [update]
# Partitions: server-side applied (create + patch), watched for hand edits,
# pruned when the network shrinks.
- apiGroups: [mpnn.dev]
  resources: [partitions]
  verbs: [list, watch, create, patch, delete]
# The lookup ConfigMap: applied, and read back for the table in force.
- apiGroups: [""]
  resources: [configmaps]
  verbs: [get, create, patch]
# The headless and the inference Service: read (never take over one the network does
# not control), applied (deleted by garbage collection).
- apiGroups: [""]
  resources: [services]
  verbs: [get, create, patch]
# The model claim: read (whose is it?), applied, watched (made again when deleted),
# pruned when spec.storage.nfs goes away.
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create, patch, delete]
# The partition servers: applied, watched for readiness.
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch]
# The partition servers' disruption budget: applied (server-side apply needs only patch; create
# for the API server's admission of a new object).
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [create, patch]
# Pod readiness for each Partition's status.
- apiGroups: [""]
  resources: [pods]
  verbs: [list]
# Training Jobs: created once per run (never updated), watched for their outcome,
# deleted when another run replaces them.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [create, list, watch, delete]
# Whether a training Job's ServiceAccount exists (its pods cannot start otherwise).
- apiGroups: [""]
  resources: [serviceaccounts]
  verbs: [get]
# Each network's peer key, Secret <name>-peer-key: created once with random bits, read
# (is the name this network's?), deleted by nothing but the garbage collector and
# this verb. Never list or watch: the operator sees no Secret it does not name.
# resourceNames cannot narrow this: the names follow the networks, and create is
# authorized before a name exists.
- apiGroups: [""]
  resources: [secrets]
  verbs: [create, get, delete]
# The NetworkPolicy <name>-peers: applied, read, deleted with networkPolicy: false.
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, create, patch, delete]
# Events on NeuralNetworks (kopf posts core v1 Events).
- apiGroups: [""]
  resources: [events]
  verbs: [create]
{{- end }}
