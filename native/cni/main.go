// nodemesh-cni: a chained CNI plugin (it runs after the network plugin that gave the pod its
// interface and addresses). On ADD it hands the pod to the node's nodemesh agent over the agent's
// enrollment socket and returns only once the agent has captured and verified it, so a pod's
// containers start inside the mesh; if the agent refuses or does not answer in time, the runtime
// gets a CNI error and retries the sandbox later (a pod never starts outside the mesh). DEL tells
// the agent the pod is going (idempotent: success when there is no agent or no such pod). CHECK
// asks the agent whether the pod is still captured. VERSION is the CNI library's.
//
// Configuration (the agent adds it to the node's conflist):
//
//	{"type": "nodemesh-cni", "enrollSocket": "/var/run/nodemesh/enroll.sock",
//	 "timeoutSeconds": 20, "excludeNamespaces": ["kube-system"]}
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// Error codes: 11 is the spec's "try again later" (no agent, or no answer in time); 100 and up
// are this plugin's.
const (
	errTryAgainLater  = 11
	errAgentRefused   = 100
	errNotInMesh      = 101
	errBadInvocation  = 102
	defaultSocket     = "/var/run/nodemesh/enroll.sock"
	defaultTimeoutSec = 20
	maxTimeoutSec     = 300
)

type netConf struct {
	types.NetConf
	EnrollSocket      string   `json:"enrollSocket,omitempty"`
	TimeoutSeconds    int      `json:"timeoutSeconds,omitempty"`
	ExcludeNamespaces []string `json:"excludeNamespaces,omitempty"`
}

// k8sArgs: what the runtime says of the pod in CNI_ARGS (containerd and CRI-O set these).
type k8sArgs struct {
	Namespace string
	Name      string
	UID       string
	Sandbox   string
}

func parseConf(args *skel.CmdArgs) (*netConf, error) {
	conf := &netConf{}
	if err := json.Unmarshal(args.StdinData, conf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, "the network configuration is not JSON", err.Error())
	}
	if conf.EnrollSocket == "" {
		conf.EnrollSocket = defaultSocket
	}
	if conf.TimeoutSeconds == 0 {
		conf.TimeoutSeconds = defaultTimeoutSec
	}
	if conf.TimeoutSeconds < 1 || conf.TimeoutSeconds > maxTimeoutSec {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("timeoutSeconds %d must be from 1 to %d", conf.TimeoutSeconds, maxTimeoutSec), "")
	}
	if conf.RawPrevResult != nil {
		if err := version.ParsePrevResult(&conf.NetConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, "prevResult cannot be read", err.Error())
		}
	}
	return conf, nil
}

func parseK8sArgs(s string) (k8sArgs, error) {
	var a k8sArgs
	for _, kv := range strings.Split(s, ";") {
		if kv == "" {
			continue
		}
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return a, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("CNI_ARGS: %q is not KEY=VALUE", kv), "")
		}
		switch k {
		case "K8S_POD_NAMESPACE":
			a.Namespace = v
		case "K8S_POD_NAME":
			a.Name = v
		case "K8S_POD_UID":
			a.UID = v
		case "K8S_POD_INFRA_CONTAINER_ID":
			a.Sandbox = v
		}
	}
	return a, nil
}

// parseArgs: the configuration and the pod the runtime names.
func parseArgs(args *skel.CmdArgs) (*netConf, k8sArgs, error) {
	conf, err := parseConf(args)
	if err != nil {
		return nil, k8sArgs{}, err
	}
	k, err := parseK8sArgs(args.Args)
	return conf, k, err
}

// post: a JSON request to the agent's enrollment socket, bounded by ctx.
func post(ctx context.Context, conf *netConf, path string, body any) (*http.Response, error) {
	text, _ := json.Marshal(body)
	req, _ := http.NewRequestWithContext(ctx, http.MethodPost, "http://agent"+path, bytes.NewReader(text))
	req.Header.Set("content-type", "application/json")
	return agentClient(conf.EnrollSocket).Do(req)
}

func excluded(conf *netConf, ns string) bool {
	for _, e := range conf.ExcludeNamespaces {
		if e == ns {
			return true
		}
	}
	return false
}

// agentClient: HTTP over the agent's unix socket.
func agentClient(socket string) *http.Client {
	return &http.Client{Transport: &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", socket)
		},
	}}
}

// agentUnreachable: no socket, or nobody listening on it (an agent that is down).
func agentUnreachable(err error) bool {
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ECONNREFUSED)
}

type cniPod struct {
	UID         string `json:"uid,omitempty"`
	Namespace   string `json:"namespace"`
	Name        string `json:"name"`
	NetnsPath   string `json:"netnsPath"`
	IP4         string `json:"ip4"`
	IP6         string `json:"ip6"`
	ContainerID string `json:"containerId"`
}

type agentError struct {
	Error struct {
		Code    string `json:"code"`
		Message string `json:"message"`
		Hint    string `json:"hint,omitempty"`
	} `json:"error"`
}

// podAddresses: the pod's first IPv4 and IPv6 address from the previous plugin's result.
func podAddresses(conf *netConf) (string, string, error) {
	if conf.PrevResult == nil {
		return "", "", types.NewError(errBadInvocation, "nodemesh-cni is a chained plugin: it needs the previous plugin's result (prevResult) with the pod's addresses", "put it after the network plugin in the conflist's plugins")
	}
	res, err := current.NewResultFromResult(conf.PrevResult)
	if err != nil {
		return "", "", types.NewError(types.ErrDecodingFailure, "prevResult cannot be converted", err.Error())
	}
	ip4, ip6 := "", ""
	for _, ip := range res.IPs {
		if ip.Address.IP.To4() != nil {
			if ip4 == "" {
				ip4 = ip.Address.IP.String()
			}
		} else if ip6 == "" {
			ip6 = ip.Address.IP.String()
		}
	}
	if ip4 == "" && ip6 == "" {
		return "", "", types.NewError(errBadInvocation, "the previous plugin's result has no address for the pod", "")
	}
	return ip4, ip6, nil
}

func cmdAdd(args *skel.CmdArgs) error {
	conf, k, err := parseArgs(args)
	if err != nil {
		return err
	}
	if k.Namespace == "" || k.Name == "" {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "CNI_ARGS has no K8S_POD_NAMESPACE and K8S_POD_NAME: nodemesh-cni serves Kubernetes pods", args.Args)
	}
	if excluded(conf, k.Namespace) {
		return passThrough(conf)
	}
	ip4, ip6, err := podAddresses(conf)
	if err != nil {
		return err
	}
	// Our own deadline as well as the agent's: the runtime is never held past it.
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(conf.TimeoutSeconds)*time.Second+time.Second)
	defer cancel()
	resp, err := post(ctx, conf, "/v1/cni/pods", map[string]any{
		"pod":       cniPod{UID: k.UID, Namespace: k.Namespace, Name: k.Name, NetnsPath: args.Netns, IP4: ip4, IP6: ip6, ContainerID: args.ContainerID},
		"timeoutMs": conf.TimeoutSeconds * 1000,
	})
	pod := k.Namespace + "/" + k.Name
	if err != nil {
		if ctx.Err() != nil {
			return types.NewError(errTryAgainLater, fmt.Sprintf("the nodemesh agent did not capture pod %s within %d s", pod, conf.TimeoutSeconds), "see the agent's log on this node")
		}
		if agentUnreachable(err) {
			return types.NewError(errTryAgainLater, fmt.Sprintf("no nodemesh agent answers on %s: pod %s is not started outside the mesh", conf.EnrollSocket, pod), err.Error())
		}
		return types.NewError(errTryAgainLater, fmt.Sprintf("the enrollment of pod %s was cut off", pod), err.Error())
	}
	defer resp.Body.Close()
	text, _ := io.ReadAll(io.LimitReader(resp.Body, 64*1024))
	if resp.StatusCode != http.StatusOK {
		var e agentError
		_ = json.Unmarshal(text, &e)
		msg := e.Error.Message
		if msg == "" {
			msg = fmt.Sprintf("HTTP %d", resp.StatusCode)
		}
		code := uint(errAgentRefused)
		if e.Error.Code == "NM_ERR_ENROLL_TIMEOUT" {
			code = errTryAgainLater
		}
		return types.NewError(code, fmt.Sprintf("the nodemesh agent refused pod %s: %s", pod, msg), e.Error.Hint)
	}
	return passThrough(conf)
}

// passThrough: a chained plugin returns the previous result unchanged.
func passThrough(conf *netConf) error {
	if conf.PrevResult == nil {
		return types.PrintResult(&current.Result{CNIVersion: current.ImplementedSpecVersion}, conf.CNIVersion)
	}
	return types.PrintResult(conf.PrevResult, conf.CNIVersion)
}

func cmdDel(args *skel.CmdArgs) error {
	conf, k, err := parseArgs(args)
	if conf == nil {
		return err
	}
	if err != nil || k.Namespace == "" || excluded(conf, k.Namespace) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// DEL is best effort and idempotent: no agent, or one that does not answer, is no error
	// (the agent unenrolls a pod whose Pod object or network namespace is gone on its own).
	if resp, err := post(ctx, conf, "/v1/cni/release", map[string]any{"namespace": k.Namespace, "name": k.Name, "uid": k.UID, "containerId": args.ContainerID}); err == nil {
		resp.Body.Close()
	}
	return nil
}

func cmdCheck(args *skel.CmdArgs) error {
	conf, k, err := parseArgs(args)
	if err != nil {
		return err
	}
	if k.Namespace == "" || excluded(conf, k.Namespace) {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := post(ctx, conf, "/v1/cni/check", map[string]any{"namespace": k.Namespace, "name": k.Name, "uid": k.UID, "netnsPath": args.Netns})
	pod := k.Namespace + "/" + k.Name
	if err != nil {
		return types.NewError(errTryAgainLater, fmt.Sprintf("no nodemesh agent answers on %s to check pod %s", conf.EnrollSocket, pod), err.Error())
	}
	defer resp.Body.Close()
	text, _ := io.ReadAll(io.LimitReader(resp.Body, 64*1024))
	if resp.StatusCode != http.StatusOK {
		var e agentError
		_ = json.Unmarshal(text, &e)
		return types.NewError(errNotInMesh, fmt.Sprintf("pod %s is not captured: %s", pod, e.Error.Message), e.Error.Hint)
	}
	return nil
}

// podUID is what a Kubernetes pod UID looks like (it names a socket file: nothing else may).
var podUID = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// agentReady is the agent DaemonSet's readiness probe (`nodemesh-cni agent-ready`, an exec
// probe): it asks this pod's own agent, on <run dir>/ready-<pod uid>.sock, whether it is ready.
// While one agent takes a node over from another, both pods share the host's port 15021, so an
// HTTP probe there could be answered by the other agent. The pod's UID comes from the container's
// environment (NODEMESH_POD_UID, the downward API). A static binary: the probe costs a few ms.
func agentReady(args []string) int {
	runDir := "/var/run/nodemesh"
	for i := 0; i < len(args); i++ {
		if args[i] == "--run-dir" && i+1 < len(args) {
			runDir = args[i+1]
			i++
		} else {
			fmt.Fprintf(os.Stderr, "nodemesh-cni agent-ready: unknown argument %q (usage: agent-ready [--run-dir DIR])\n", args[i])
			return 2
		}
	}
	uid := os.Getenv("NODEMESH_POD_UID")
	if !podUID.MatchString(uid) {
		fmt.Fprintf(os.Stderr, "nodemesh-cni agent-ready: NODEMESH_POD_UID %q is not a pod UID (set it from metadata.uid)\n", uid)
		return 2
	}
	path := filepath.Join(runDir, "ready-"+uid+".sock")
	client := http.Client{
		Timeout: 3 * time.Second,
		Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}},
	}
	resp, err := client.Get("http://agent/healthz/ready")
	if err != nil {
		fmt.Printf("not ready: this pod's agent does not answer on %s: %v\n", path, err)
		return 1
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 64*1024))
	os.Stdout.Write(body)
	if resp.StatusCode != http.StatusOK {
		return 1
	}
	return 0
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "agent-ready" {
		os.Exit(agentReady(os.Args[2:]))
	}
	skel.PluginMainFuncs(skel.CNIFuncs{Add: cmdAdd, Del: cmdDel, Check: cmdCheck}, version.PluginSupports("0.4.0", "1.0.0", "1.1.0"), "nodemesh-cni: holds a pod's start until the node's nodemesh agent has captured it")
}
