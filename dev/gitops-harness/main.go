// Command gitops-harness computes the health of FineTuneJob dumps the way GitOps tools do,
// with their own libraries: kstatus (Flux, kubectl tooling), Argo CD's Lua VM (gopher-lua,
// standard libraries off as Argo CD runs health checks) and Flux's healthCheckExprs (cel-go).
//
//	gitops-harness report --lua health.lua --flux kustomization.yaml DUMP...
//	    one JSON line per dump: {"file", "kstatus": {status, message}, "argocd": {...}, "flux": {...}}
//	gitops-harness argocd-test DIR
//	    runs DIR/health_test.yaml against DIR/health.lua like Argo CD's own tests; exit 1 on a mismatch
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/google/cel-go/cel"
	"github.com/google/cel-go/common/types"
	"github.com/google/cel-go/ext"
	lua "github.com/yuin/gopher-lua"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/cli-utils/pkg/kstatus/status"
	"sigs.k8s.io/yaml"
)

// Health is one tool's verdict on one object.
type Health struct {
	Status  string `json:"status"`
	Message string `json:"message,omitempty"`
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: gitops-harness report|argocd-test ...")
	}
	var err error
	switch os.Args[1] {
	case "report":
		err = report(os.Args[2:])
	case "argocd-test":
		err = argocdTest(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err.Error())
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "gitops-harness:", message)
	os.Exit(1)
}

func report(args []string) error {
	flags := flag.NewFlagSet("report", flag.ContinueOnError)
	luaPath := flags.String("lua", "", "Argo CD health.lua")
	fluxPath := flags.String("flux", "", "a Flux Kustomization with healthCheckExprs for FineTuneJob")
	if err := flags.Parse(args); err != nil {
		return err
	}
	script, err := os.ReadFile(*luaPath)
	if err != nil {
		return err
	}
	exprs, err := fluxExpressions(*fluxPath)
	if err != nil {
		return err
	}
	out := json.NewEncoder(os.Stdout)
	for _, file := range flags.Args() {
		obj, err := load(file)
		if err != nil {
			return err
		}
		line := map[string]any{"file": file}
		line["kstatus"] = kstatusHealth(obj)
		line["argocd"] = orError(argocdHealth(obj, string(script)))
		line["flux"] = orError(exprs.evaluate(obj))
		if err := out.Encode(line); err != nil {
			return err
		}
	}
	return nil
}

func orError(health Health, err error) Health {
	if err != nil {
		return Health{Status: "Error", Message: err.Error()}
	}
	return health
}

func load(path string) (*unstructured.Unstructured, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	// Through JSON and the unstructured decoder, as a client reads it: integers stay int64.
	asJSON, err := yaml.YAMLToJSON(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	obj := &unstructured.Unstructured{}
	if err := obj.UnmarshalJSON(asJSON); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return obj, nil
}

// kstatus: the library behind Flux's health checks and kubectl tooling.
func kstatusHealth(obj *unstructured.Unstructured) Health {
	result, err := status.Compute(obj)
	if err != nil {
		return Health{Status: "Error", Message: err.Error()}
	}
	return Health{Status: result.Status.String(), Message: result.Message}
}

// argocdHealth runs a health.lua as Argo CD does at run time: only the package, base and
// table libraries open (no string, io, os), the object as the global `obj`, one second at most.
func argocdHealth(obj *unstructured.Unstructured, script string) (Health, error) {
	l := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer l.Close()
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.LoadLibName, lua.OpenPackage}, {lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}} {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(lib.open), Protect: true}, lua.LString(lib.name)); err != nil {
			return Health{}, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj.Object))
	if err := l.DoString(script); err != nil {
		return Health{}, err
	}
	table, ok := l.Get(-1).(*lua.LTable)
	if !ok {
		return Health{}, fmt.Errorf("health.lua returned %s, not a table", l.Get(-1).Type())
	}
	health := Health{Status: lua.LVAsString(table.RawGetString("status")), Message: lua.LVAsString(table.RawGetString("message"))}
	switch health.Status {
	case "Healthy", "Progressing", "Suspended", "Degraded", "Missing", "Unknown":
		return health, nil
	}
	return Health{}, fmt.Errorf("health.lua returned an invalid health status %q", health.Status)
}

func toLua(l *lua.LState, value any) lua.LValue {
	switch v := value.(type) {
	case map[string]any:
		table := l.NewTable()
		for key, item := range v {
			table.RawSetString(key, toLua(l, item))
		}
		return table
	case []any:
		table := l.NewTable()
		for index, item := range v {
			table.RawSetInt(index+1, toLua(l, item))
		}
		return table
	case string:
		return lua.LString(v)
	case bool:
		return lua.LBool(v)
	case float64:
		return lua.LNumber(v)
	case int64:
		return lua.LNumber(v)
	case nil:
		return lua.LNil
	}
	return lua.LString(fmt.Sprint(value))
}

type argocdTests struct {
	Tests []struct {
		HealthStatus Health `json:"healthStatus"`
		InputPath    string `json:"inputPath"`
	} `json:"tests"`
}

func argocdTest(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: gitops-harness argocd-test DIR")
	}
	dir := args[0]
	script, err := os.ReadFile(filepath.Join(dir, "health.lua"))
	if err != nil {
		return err
	}
	data, err := os.ReadFile(filepath.Join(dir, "health_test.yaml"))
	if err != nil {
		return err
	}
	var suite argocdTests
	if err := yaml.UnmarshalStrict(data, &suite); err != nil {
		return fmt.Errorf("health_test.yaml: %w", err)
	}
	if len(suite.Tests) == 0 {
		return errors.New("health_test.yaml has no tests")
	}
	failures := 0
	for _, test := range suite.Tests {
		obj, err := load(filepath.Join(dir, test.InputPath))
		if err != nil {
			return err
		}
		got, err := argocdHealth(obj, string(script))
		if err != nil {
			got = Health{Status: "Error", Message: err.Error()}
		}
		verdict := "ok  "
		if got != test.HealthStatus {
			verdict = "FAIL"
			failures++
		}
		fmt.Printf("%s %s: got %s %q, want %s %q\n", verdict, test.InputPath, got.Status, got.Message,
			test.HealthStatus.Status, test.HealthStatus.Message)
	}
	if failures > 0 {
		return fmt.Errorf("%d of %d health tests failed", failures, len(suite.Tests))
	}
	return nil
}

// Flux: healthCheckExprs evaluated as kustomize-controller does (fluxcd/pkg runtime/cel,
// RFC-0009): a stale observedGeneration is InProgress; then inProgress, failed, current in
// that order, the first true one wins; none true is InProgress.
type fluxExprs struct {
	inProgress, failed, current cel.Program
}

func fluxExpressions(path string) (*fluxExprs, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	var kustomization struct {
		Spec struct {
			HealthCheckExprs []struct {
				APIVersion string `json:"apiVersion"`
				Kind       string `json:"kind"`
				InProgress string `json:"inProgress"`
				Failed     string `json:"failed"`
				Current    string `json:"current"`
			} `json:"healthCheckExprs"`
		} `json:"spec"`
	}
	if err := yaml.Unmarshal(data, &kustomization); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	for _, entry := range kustomization.Spec.HealthCheckExprs {
		if entry.Kind != "FineTuneJob" || entry.APIVersion != "finetune.dev/v1alpha1" {
			continue
		}
		if entry.Current == "" {
			return nil, errors.New("healthCheckExprs: current is required")
		}
		exprs := &fluxExprs{}
		for _, e := range []struct {
			source string
			into   *cel.Program
		}{{entry.InProgress, &exprs.inProgress}, {entry.Failed, &exprs.failed}, {entry.Current, &exprs.current}} {
			if e.source == "" {
				continue
			}
			if *e.into, err = celProgram(e.source); err != nil {
				return nil, err
			}
		}
		return exprs, nil
	}
	return nil, fmt.Errorf("%s: no healthCheckExprs entry for finetune.dev/v1alpha1 FineTuneJob", path)
}

func celProgram(source string) (cel.Program, error) {
	env, err := cel.NewEnv(
		cel.HomogeneousAggregateLiterals(),
		cel.EagerlyValidateDeclarations(true),
		cel.DefaultUTCTimeZone(true),
		cel.CrossTypeNumericComparisons(true),
		cel.OptionalTypes(),
		ext.Strings(),
		ext.Sets(),
		ext.Encoders(),
	)
	if err != nil {
		return nil, err
	}
	parsed, issues := env.Parse(source) // parsed, not compiled: Flux declares no variables
	if issues != nil && issues.Err() != nil {
		return nil, fmt.Errorf("CEL %q: %w", source, issues.Err())
	}
	return env.Program(parsed, cel.EvalOptions(cel.OptOptimize), cel.InterruptCheckFrequency(100))
}

func (f *fluxExprs) evaluate(obj *unstructured.Unstructured) (Health, error) {
	observed, found, err := unstructured.NestedInt64(obj.Object, "status", "observedGeneration")
	if err != nil {
		return Health{}, err
	}
	if found && observed != obj.GetGeneration() {
		return Health{Status: "InProgress", Message: "observedGeneration is behind metadata.generation"}, nil
	}
	for _, e := range []struct {
		program cel.Program
		status  string
	}{{f.inProgress, "InProgress"}, {f.failed, "Failed"}, {f.current, "Current"}} {
		if e.program == nil {
			continue
		}
		value, _, err := e.program.Eval(obj.Object)
		if err != nil {
			return Health{}, err
		}
		result, ok := value.(types.Bool)
		if !ok {
			return Health{}, fmt.Errorf("expression for %s is not a boolean", e.status)
		}
		if result {
			return Health{Status: e.status}, nil
		}
	}
	return Health{Status: "InProgress", Message: "no expression is true"}, nil
}
