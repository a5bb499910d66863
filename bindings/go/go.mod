module github.com/packinfer/packinfer/bindings/go

go 1.21
