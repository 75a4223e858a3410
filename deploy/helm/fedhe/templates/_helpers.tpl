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
{{- fail (printf "%s is empty: set a pinned image version such as the chart's appVersion (an empty tag pulls \"latest\")" .what) -}}
{{- end -}}
{{- if eq (lower $tag) "latest" -}}
{{- fail (printf "%s is \"latest\": set a pinned image version such as the chart's appVersion (\"latest\" is mutable and not reproducible)" .what) -}}
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

{{/* "https", or "http" with tls.insecureHttp. Takes the root context. */}}
{{- define "fedhe.scheme" -}}
{{- ternary "http" "https" .Values.tls.insecureHttp -}}
{{- end -}}

{{/* In-cluster URLs of the two services of this release. Take the root context. */}}
{{- define "fedhe.keyserverUrl" -}}
{{- printf "%s://%s:%d" (include "fedhe.scheme" .) (include "fedhe.fullname" (dict "context" . "component" "keyserver")) (int .Values.keyserver.service.port) -}}
{{- end -}}

{{- define "fedhe.aggregatorUrl" -}}
{{- printf "%s://%s:%d" (include "fedhe.scheme" .) (include "fedhe.fullname" (dict "context" . "component" "aggregator")) (int .Values.aggregator.service.port) -}}
{{- end -}}

{{/*
The keyserver's audience: keyserver.publicUrl, or its in-cluster URL, without a trailing slash
(the keyserver and the agents both strip it before comparing). Takes the root context.
*/}}
{{- define "fedhe.keyserverPublicUrl" -}}
{{- .Values.keyserver.publicUrl | default (include "fedhe.keyserverUrl" .) | trimSuffix "/" -}}
{{- end -}}

{{/*
Refuses an http:// URL while TLS is on (the services would refuse it at start, later and less
clearly). Takes (dict "context" $ "url" "..." "what" "aggregator.keyserverUrl").
*/}}
{{- define "fedhe.checkUrl" -}}
{{- if and (hasPrefix "http://" .url) (not .context.Values.tls.insecureHttp) -}}
{{- fail (printf "%s is %s, a plain-HTTP URL, but TLS is on: use https:// (or set tls.insecureHttp=true for a plain-HTTP trial)" .what .url) -}}
{{- end -}}
{{- end -}}

{{/*
Fails unless a required Secret name is set. Takes (dict "value" ... "what" "keyserver.kek.existingSecret" "keys" "kek").
*/}}
{{- define "fedhe.requireSecret" -}}
{{- if not .value -}}
{{- fail (printf "%s is required: create a Secret with the key %s in the release namespace and give its name (the chart never takes secret values itself; see README.md, Secrets)" .what .keys) -}}
{{- end -}}
{{- end -}}

{{/*
A Redis URL as environment variable: from a Secret, or a plain URL without credentials; with it,
the prefix of every key the service writes (redis.keyPrefix, or <namespace>.<release>), so
releases that share one Redis never read each other's leases, events, nonces or counters.
Takes (dict "context" $ "prefix" "FEDHE_AGGREGATOR" "redis" <values> "what" "aggregator.redis").
*/}}
{{- define "fedhe.redisEnv" -}}
{{- if and .redis.url (contains "@" .redis.url) -}}
{{- fail (printf "%s.url carries credentials: put the URL in a Secret and set %s.existingSecret instead" .what .what) -}}
{{- end -}}
{{- if .redis.existingSecret }}
- name: {{ .prefix }}_REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .redis.existingSecret | quote }}
      key: {{ .redis.key | quote }}
{{- else if .redis.url }}
- name: {{ .prefix }}_REDIS_URL
  value: {{ .redis.url | quote }}
{{- end }}
{{- if or .redis.existingSecret .redis.url }}
- name: {{ .prefix }}_REDIS_KEY_PREFIX
  value: {{ .redis.keyPrefix | default (printf "%s.%s" .context.Release.Namespace .context.Release.Name) | quote }}
{{- end }}
{{- end -}}

{{/*
Extra environment variables, refusing plain values for secret-looking names, and refusing the
TLS settings outright: TLS (or its absence) is decided by the tls values alone, so that an
"insecure" install is always visible in the values and in NOTES.txt.
Takes (dict "env" list "what" "aggregator.extraEnv"); use it inside {{ with <list> }}.
*/}}
{{- define "fedhe.extraEnv" -}}
{{- range .env -}}
{{- if regexMatch "^FEDHE_[A-Z]+_(INSECURE_HTTP|TLS_[A-Z_]+)$" (toString .name) -}}
{{- fail (printf "%s: %s is set by the chart from the tls values (tls.insecureHttp, *.tls.*); it cannot be given in extraEnv" $.what .name) -}}
{{- end -}}
{{- /* RATE_LIMIT_PER_CREDENTIAL is a number, not a credential */ -}}
{{- if and (hasKey . "value") (regexMatch "(?i)(TOKEN|SECRET|PASSWORD|PASSWD|KEK|CREDENTIAL|PRIVATE_KEY|DATABASE_URL|REDIS_URL|DSN)$" (toString .name)) (not (regexMatch "(?i)_PER_CREDENTIAL$" (toString .name))) -}}
{{- fail (printf "%s: %s has a plain value; secrets (and database/Redis URLs, which carry credentials) must come from valueFrom.secretKeyRef" $.what .name) -}}
{{- end -}}
{{- end -}}
{{- toYaml .env -}}
{{- end -}}

{{/* ---- TLS ------------------------------------------------------------------------------ */}}

{{/* "true" when a service of this release requires client certificates. Takes the root context. */}}
{{- define "fedhe.anyMutual" -}}
{{- if and (not .Values.tls.insecureHttp) (or (and .Values.keyserver.enabled .Values.keyserver.tls.mutual.enabled) (and .Values.aggregator.enabled .Values.aggregator.tls.mutual.enabled)) -}}
true
{{- end -}}
{{- end -}}

{{/*
Name of the Secret a service serves TLS from: the one cert-manager writes for the chart's
Certificate, or the one given. Takes (dict "context" $ "component" "keyserver").
*/}}
{{- define "fedhe.tlsSecretName" -}}
{{- if .context.Values.tls.certManager.enabled -}}
{{- include "fedhe.fullname" (dict "context" .context "component" .component "suffix" "tls") -}}
{{- else -}}
{{- (index .context.Values .component).tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{/*
Exactly one TLS source per service: a Secret, cert-manager, or (explicitly) none.
Takes (dict "context" $ "component" "keyserver").
*/}}
{{- define "fedhe.checkTls" -}}
{{- $tls := .context.Values.tls -}}
{{- $svc := (index .context.Values .component).tls -}}
{{- if $tls.insecureHttp -}}
{{- if $tls.certManager.enabled -}}
{{- fail "tls.insecureHttp and tls.certManager.enabled are both true: choose HTTPS (certManager) or the plain-HTTP trial, not both" -}}
{{- end -}}
{{- if $svc.existingSecret -}}
{{- fail (printf "tls.insecureHttp is true but %s.tls.existingSecret is set: unset tls.insecureHttp to serve HTTPS from that Secret" .component) -}}
{{- end -}}
{{- if $svc.mutual.enabled -}}
{{- fail (printf "%s.tls.mutual.enabled needs TLS: it cannot be combined with tls.insecureHttp" .component) -}}
{{- end -}}
{{- else if $tls.certManager.enabled -}}
{{- if not $tls.certManager.issuerRef.name -}}
{{- fail "tls.certManager.issuerRef.name is required with tls.certManager.enabled: name the Issuer or ClusterIssuer that signs fedhe's certificates" -}}
{{- end -}}
{{- if $svc.existingSecret -}}
{{- fail (printf "%s.tls.existingSecret is set while tls.certManager.enabled is true: the chart's Certificate writes Secret %s itself; unset one of them" .component (include "fedhe.tlsSecretName" .)) -}}
{{- end -}}
{{- else if not $svc.existingSecret -}}
{{- fail (printf "%s.tls.existingSecret is required: TLS is on by default. Create a kubernetes.io/tls Secret with tls.crt, tls.key and ca.crt (fedhe dev-ca or your own PKI) and give its name, or set tls.certManager.enabled=true with tls.certManager.issuerRef, or tls.insecureHttp=true for a plain-HTTP trial" .component) -}}
{{- end -}}
{{- end -}}

{{/*
TLS environment of a service. With tls.insecureHttp only FEDHE_<SVC>_INSECURE_HTTP; otherwise
its certificate and key, the client CA under mutual TLS, and (for a service that calls another)
the CA it verifies that service with. Its own certificate doubles as its client certificate.
Takes (dict "context" $ "component" "aggregator" "prefix" "FEDHE_AGGREGATOR" "peerCa" true).
*/}}
{{- define "fedhe.tlsEnv" -}}
{{- $svc := (index .context.Values .component).tls -}}
{{- if .context.Values.tls.insecureHttp }}
- name: {{ .prefix }}_INSECURE_HTTP
  value: "true"
{{- else }}
- name: {{ .prefix }}_TLS_CERT_FILE
  value: /etc/fedhe/tls/tls.crt
- name: {{ .prefix }}_TLS_KEY_FILE
  value: /etc/fedhe/tls/tls.key
{{- if $svc.mutual.enabled }}
- name: {{ .prefix }}_TLS_CLIENT_CA_FILE
  value: /etc/fedhe/tls/client-ca.crt
{{- end }}
{{- if .peerCa }}
- name: {{ .prefix }}_TLS_CA_FILE
  value: /etc/fedhe/tls/ca.crt
{{- end }}
{{- end }}
{{- end -}}

{{/* The TLS volume mount of a service (nothing with tls.insecureHttp). Takes the root context. */}}
{{- define "fedhe.tlsMount" -}}
{{- if not .Values.tls.insecureHttp }}
- name: tls
  mountPath: /etc/fedhe/tls
  readOnly: true
{{- end }}
{{- end -}}

{{/*
The TLS volume of a service: its certificate and key, the client CA under mutual TLS, and the
CA it verifies the service it calls with ("peerCa": a dict with existingSecret and key, empty
name meaning ca.crt of its own TLS Secret). Takes (dict "context" $ "component" "aggregator" "peerCa" ...).
*/}}
{{- define "fedhe.tlsVolume" -}}
{{- if not .context.Values.tls.insecureHttp }}
{{- $svc := (index .context.Values .component).tls -}}
{{- $secret := include "fedhe.tlsSecretName" . }}
- name: tls
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ $secret | quote }}
          items:
            - key: tls.crt
              path: tls.crt
            - key: tls.key
              path: tls.key
      {{- if $svc.mutual.enabled }}
      - secret:
          name: {{ $svc.mutual.clientCa.existingSecret | default $secret | quote }}
          items:
            - key: {{ $svc.mutual.clientCa.key | quote }}
              path: client-ca.crt
      {{- end }}
      {{- with .peerCa }}
      - secret:
          name: {{ .existingSecret | default $secret | quote }}
          items:
            - key: {{ .key | quote }}
              path: ca.crt
      {{- end }}
{{- end }}
{{- end -}}

{{/* Issuer, lifetime and key of every cert-manager Certificate of the chart. Takes the root context. */}}
{{- define "fedhe.certificateCommon" -}}
{{- $cm := .Values.tls.certManager -}}
duration: {{ $cm.duration }}
renewBefore: {{ $cm.renewBefore }}
privateKey:
  algorithm: {{ $cm.privateKey.algorithm }}
  {{- if ne $cm.privateKey.algorithm "Ed25519" }}
  size: {{ $cm.privateKey.size }}
  {{- end }}
  encoding: PKCS8
  # A fresh key at every renewal: an old key that leaked stops being useful.
  rotationPolicy: Always
issuerRef:
  name: {{ $cm.issuerRef.name }}
  kind: {{ $cm.issuerRef.kind }}
  group: {{ $cm.issuerRef.group }}
{{- end -}}

{{/*
Key usages of a chart Certificate: servers also authenticate as clients (see certificates.yaml);
key encipherment only means something for RSA keys. Takes (dict "context" $ "server" bool).
*/}}
{{- define "fedhe.certificateUsages" -}}
usages:
  - digital signature
  {{- if eq .context.Values.tls.certManager.privateKey.algorithm "RSA" }}
  - key encipherment
  {{- end }}
  {{- if .server }}
  - server auth
  {{- end }}
  - client auth
{{- end -}}

{{/*
Secret files of a container as one projected volume "secrets" (mounted at
/var/run/secrets/fedhe). Takes a list of (dict "secret" name "key" key "path" file).
*/}}
{{- define "fedhe.secretsVolume" -}}
- name: secrets
  projected:
    defaultMode: 0440
    sources:
      {{- range . }}
      - secret:
          name: {{ .secret | quote }}
          items:
            - key: {{ .key | quote }}
              path: {{ .path }}
      {{- end }}
{{- end -}}

{{/*
The "annotations:" of a service's pods: prometheus.io/* for Prometheus jobs that discover pods by
annotation (with metrics.podAnnotations), overlaid with <component>.podAnnotations, which win.
Nothing when both are empty. Takes (dict "context" $ "component" "aggregator" "port" 8080).
*/}}
{{- define "fedhe.podAnnotations" -}}
{{- $annotations := dict -}}
{{- if .context.Values.metrics.podAnnotations -}}
{{- $annotations = dict "prometheus.io/scrape" "true" "prometheus.io/scheme" (include "fedhe.scheme" .context) "prometheus.io/port" (toString .port) "prometheus.io/path" "/metrics" -}}
{{- end -}}
{{- $annotations = merge (deepCopy (index .context.Values .component).podAnnotations) $annotations -}}
{{- with $annotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end -}}
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

{{/*
Startup and liveness probes on /healthz, readiness on /readyz (which checks the database).
Over HTTPS the kubelet connects without verifying, as it always does. It cannot present a
client certificate, so under mutual TLS the probe runs inside the container instead: Python
(already in the image) presenting the pod's own certificate, which must therefore allow client
authentication. It does not verify the server either: a probe asks "does it answer", not "who
is it". Takes (dict "context" $ "component" "keyserver" "port" 8090).
*/}}
{{- define "fedhe.probes" -}}
{{- $values := index .context.Values .component -}}
{{- $insecure := .context.Values.tls.insecureHttp -}}
{{- $port := .port -}}
{{- range $kind, $path := dict "startup" "/healthz" "liveness" "/healthz" "readiness" "/readyz" }}
{{- $timing := index $values.probes $kind }}
{{ $kind }}Probe:
  {{- if and (not $insecure) $values.tls.mutual.enabled }}
  exec:
    command:
      - python
      - -c
      - "import ssl,sys,urllib.request as u;c=ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT);c.check_hostname=False;c.verify_mode=ssl.CERT_NONE;c.load_cert_chain(sys.argv[2],sys.argv[3]);u.urlopen(sys.argv[1],context=c,timeout=float(sys.argv[4]))"
      - {{ printf "https://127.0.0.1:%d%s" (int $port) $path | quote }}
      - /etc/fedhe/tls/tls.crt
      - /etc/fedhe/tls/tls.key
      - {{ $timing.timeoutSeconds | default 1 | toString | quote }}
  {{- else }}
  httpGet:
    path: {{ $path }}
    port: {{ ternary "http" "https" $insecure }}
    scheme: {{ ternary "HTTP" "HTTPS" $insecure }}
  {{- end }}
  {{- toYaml $timing | nindent 2 }}
{{- end }}
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
