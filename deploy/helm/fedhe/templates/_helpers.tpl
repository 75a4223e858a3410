{{/*
Helpers shared by every template. Those about one component take a dict:
  (dict "context" $ "component" "aggregator")             keyserver, aggregator, test
  (dict "context" $ "component" "agent" "site" "site-a")  one in-cluster site agent
*/}}

{{/* Chart name, truncated to a DNS label. Takes the root context. */}}
{{- define "fedhe.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Release-wide name prefix. Takes the root context. */}}
{{- define "fedhe.prefix" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/*
Name of a component's resources: "<prefix>-<component>" (agents: "<prefix>-agent-<site>"),
with an optional "suffix" key for a second object of the same component ("policy", "state").
The prefix is shortened, never the suffix, so two components can never collide.
*/}}
{{- define "fedhe.fullname" -}}
{{- $suffix := .component -}}
{{- if .site -}}
{{- $suffix = printf "%s-%s" $suffix .site -}}
{{- end -}}
{{- if .suffix -}}
{{- $suffix = printf "%s-%s" $suffix .suffix -}}
{{- end -}}
{{- $prefix := include "fedhe.prefix" .context | trunc (int (sub 62 (len $suffix))) | trimSuffix "-" -}}
{{- printf "%s-%s" $prefix $suffix -}}
{{- end -}}

{{/* Selector labels of a component (immutable once deployed: keep them minimal). */}}
{{- define "fedhe.selectorLabels" -}}
app.kubernetes.io/name: {{ include "fedhe.name" .context }}
app.kubernetes.io/instance: {{ .context.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- with .site }}
fedhe.io/site: {{ . }}
{{- end }}
{{- end -}}

{{/* Common labels of a component's resources. */}}
{{- define "fedhe.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .context.Chart.Name .context.Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "fedhe.selectorLabels" . }}
app.kubernetes.io/version: {{ .context.Values.image.tag | default .context.Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/part-of: fedhe
app.kubernetes.io/managed-by: {{ .context.Release.Service }}
{{- end -}}

{{/* ServiceAccount used by every fedhe pod. Takes the root context. */}}
{{- define "fedhe.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "fedhe.prefix" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
A pinned image reference "[registry/]repository:tag[@digest]".
Takes (dict "what" "image.tag" "registry" "..." "repository" "..." "tag" "..." "digest" "...").
Refuses an empty tag (it would mean "latest") and "latest" itself.
*/}}
{{- define "fedhe.imageRef" -}}
{{- $tag := .tag | toString | trim -}}
{{- if not $tag -}}
{{- fail (printf "%s is empty: set a pinned image version such as \"0.1.0\" (an empty tag pulls \"latest\")" .what) -}}
{{- end -}}
{{- if eq (lower $tag) "latest" -}}
{{- fail (printf "%s is \"latest\": set a pinned image version such as \"0.1.0\" (\"latest\" is mutable and not reproducible)" .what) -}}
{{- end -}}
{{- $ref := .repository -}}
{{- with .registry -}}
{{- $ref = printf "%s/%s" (trimSuffix "/" .) $ref -}}
{{- end -}}
{{- $ref = printf "%s:%s" $ref $tag -}}
{{- with .digest -}}
{{- $ref = printf "%s@%s" $ref . -}}
{{- end -}}
{{- $ref -}}
{{- end -}}

{{/* Image of a fedhe component. Takes (dict "context" $ "repository" "fedhe-aggregator"). */}}
{{- define "fedhe.image" -}}
{{- $image := .context.Values.image -}}
{{- include "fedhe.imageRef" (dict "what" "image.tag" "registry" $image.registry "repository" .repository "tag" $image.tag "digest" $image.digest) -}}
{{- end -}}

{{/* In-cluster URLs of the two services. Take the root context. */}}
{{- define "fedhe.keyserverUrl" -}}
{{- printf "http://%s:%d" (include "fedhe.fullname" (dict "context" . "component" "keyserver")) (int .Values.keyserver.service.port) -}}
{{- end -}}

{{- define "fedhe.aggregatorUrl" -}}
{{- printf "http://%s:%d" (include "fedhe.fullname" (dict "context" . "component" "aggregator")) (int .Values.aggregator.service.port) -}}
{{- end -}}

{{/*
Fails unless a required Secret name is set. Takes (dict "value" ... "what" "keyserver.existingSecret" "keys" "kek, operator-token, service-token").
*/}}
{{- define "fedhe.requireSecret" -}}
{{- if not .value -}}
{{- fail (printf "%s is required: create a Secret with the key(s) %s in the release namespace and give its name (the chart never takes secret values itself)" .what .keys) -}}
{{- end -}}
{{- end -}}

{{/*
Extra environment variables, refusing plain values for secret-looking names.
Takes (dict "env" list "what" "aggregator.extraEnv"); use it inside {{ with <list> }}.
*/}}
{{- define "fedhe.extraEnv" -}}
{{- range .env -}}
{{- if and (hasKey . "value") (regexMatch "(?i)(TOKEN|SECRET|PASSWORD|PASSWD|KEK|CREDENTIAL|PRIVATE_KEY|DATABASE_URL|REDIS_URL|DSN)$" (toString .name)) -}}
{{- fail (printf "%s: %s has a plain value; secrets (and database/Redis URLs, which carry credentials) must come from valueFrom.secretKeyRef" $.what .name) -}}
{{- end -}}
{{- end -}}
{{- toYaml .env -}}
{{- end -}}

{{/* Pod security context (shared by every pod of the chart). Takes the root context. */}}
{{- define "fedhe.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext -}}
{{- end -}}

{{/* Container security context (shared by every container of the chart). Takes the root context. */}}
{{- define "fedhe.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext -}}
{{- end -}}

{{/*
Scratch space for a read-only root filesystem: /tmp (TMPDIR) and a memory-backed /dev/shm
where the HE codec writes ciphertext scratch files. Take the component's "scratch" values.
*/}}
{{- define "fedhe.scratchVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .tmpSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .shmSizeLimit }}
{{- end -}}

{{- define "fedhe.scratchMounts" -}}
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- end -}}

{{/* Liveness (/healthz), readiness (/readyz) and startup (/healthz) probes. Take the component's "probes" values. */}}
{{- define "fedhe.httpProbes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: http
  {{- toYaml .startup | nindent 2 }}
livenessProbe:
  httpGet:
    path: /healthz
    port: http
  {{- toYaml .liveness | nindent 2 }}
readinessProbe:
  httpGet:
    path: /readyz
    port: http
  {{- toYaml .readiness | nindent 2 }}
{{- end -}}

{{/*
Settings of one in-cluster agent: agentDefaults overlaid with the item from "agents", two
levels deep (so "persistence: {enabled: false}" overrides one key and keeps the others;
sprig's mergeOverwrite would ignore false and empty values). Returns YAML: pipe to fromYaml.
Takes (dict "defaults" .Values.agentDefaults "agent" <item>).
*/}}
{{- define "fedhe.agentValues" -}}
{{- $merged := deepCopy .defaults -}}
{{- range $key, $value := .agent -}}
{{- $base := get $merged $key -}}
{{- if and (kindIs "map" $value) (kindIs "map" $base) -}}
{{- range $innerKey, $innerValue := $value -}}
{{- $_ := set $base $innerKey $innerValue -}}
{{- end -}}
{{- else -}}
{{- $_ := set $merged $key $value -}}
{{- end -}}
{{- end -}}
{{- toYaml $merged -}}
{{- end -}}

{{/* Name of an agent's state PVC. Takes (dict "context" $ "agent" <merged agent values>). */}}
{{- define "fedhe.agentStateClaim" -}}
{{- .agent.persistence.existingClaim | default (include "fedhe.fullname" (dict "context" .context "component" "agent" "site" .agent.name "suffix" "state")) -}}
{{- end -}}
