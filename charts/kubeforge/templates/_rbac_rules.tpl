{{- /*
Exactly what the operator calls; no wildcards. Where each rule comes from:
  kubeforge.dev      kopf watches all five kinds (list, watch) and patches them (progress and
                     diff-base annotations); the
                     controllers get TrainingJobs and CheckpointPolicies, list TrainingJobs
                     (CheckpointPolicy job summaries) and delete a finished TrainingJob (ttl);
                     the Dataset controller gets Datasets and the InferenceService or
                     CheckpointPolicy a Dataset's source names. The Flywheel controller gets
                     its InferenceService, Dataset and TrainingJobs, creates a cycle's candidate
                     TrainingJob <flywheel>-c<cycle> and deletes finished ones past
                     training.maxRetainedJobs, patches the InferenceService (shadow, canary,
                     promotion, rollback) and annotates the Dataset (kubeforge.dev/curate), and
                     puts a finalizer on a Flywheel while its candidate is on the
                     InferenceService (patch).
  <kind>/status      status patches of all five kinds.
  <kind>/finalizers  children carry ownerReferences with blockOwnerDeletion: clusters running
                     the OwnerReferencesPermissionEnforcement admission plugin ask for update
                     (Datasets own their curation pods, Flywheels their evaluation pods).
  pods               TrainingJob: watch, list by label, create workers and the rendezvous pod, delete.
                     CheckpointPolicy on a volume: create, get and delete its store inspector pod.
                     Dataset: watch and list its curation pods by label, create one per version,
                     delete finished ones.
                     Flywheel: watch and list its evaluation pods by label, create one per cycle.
  services, configmaps   server-side apply of job and InferenceService children: patch, and
                     create for an apply that creates the object; list and watch, so that a
                     deleted child is made again; delete: an InferenceService's canary,
                     shadow and router Services and the router's ConfigMap when they go.
  networkpolicies    the same for the NetworkPolicy of every TrainingJob and InferenceService;
                     get (an Event when the allowed clients change) and delete (when
                     workloadNetworkPolicies.enabled is false).
  persistentvolumeclaims   get: checkpoint claims are checked.
  secrets            get, and only in the namespaces of kubeforge.rules.secrets' bindings
                     (rbac.secretNamespaces, the watchNamespaces' Roles): the S3 credentials a
                     CheckpointPolicy names, read to check the bucket, apply retention, read job
                     summaries and export markers; those of a Dataset's store, read to list its
                     capture shards and versions and apply its retention. Never list or watch.
  events             create: Events on every decision (kopf.event and the TrainingJob controller).
  deployments        InferenceService: get, apply (create, patch), and watch the ones it manages;
                     delete its canary, shadow and router Deployments when they go.
  horizontalpodautoscalers   get, apply (create, patch), delete when spec.autoscaling goes;
                     list and watch (a deleted one is made again).
  poddisruptionbudgets   apply (create, patch); list and watch (a deleted one is made again);
                     delete: an InferenceService's router budget when the router goes.
  nodes              TrainingJob: watch node health, get a node not seen yet (cluster-scoped).
  namespaces, customresourcedefinitions   kopf's own scanning (list, watch).
  kopf.dev           peering (only with replicaCount > 1): clusterkopfpeerings, or kopfpeerings
                     when watchNamespaces lists the namespaces.
*/}}
{{- define "kubeforge.rules.namespaced" }}
- apiGroups: ["kubeforge.dev"]
  resources: ["trainingjobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["kubeforge.dev"]
  resources: ["checkpointpolicies", "inferenceservices", "datasets", "flywheels"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["kubeforge.dev"]
  resources: ["trainingjobs/status", "checkpointpolicies/status", "inferenceservices/status", "datasets/status",
              "flywheels/status"]
  verbs: ["patch"]
- apiGroups: ["kubeforge.dev"]
  resources: ["trainingjobs/finalizers", "inferenceservices/finalizers", "datasets/finalizers",
              "flywheels/finalizers"]
  verbs: ["update"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["list", "watch", "create", "patch", "delete"]
{{- end }}
{{- define "kubeforge.rules.secrets" }}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- define "kubeforge.rules.cluster" }}
- apiGroups: [""]
  resources: ["nodes"]
  verbs: ["get", "list", "watch"]
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
{{- define "kubeforge.rules.peering" }}
- apiGroups: ["kopf.dev"]
  resources: [{{ .resource | quote }}]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
